"""Building the effective settings: defaults < TOML file (--config) < APPD_*
environment < flags, with gunicorn's layers in between (see gunicorn.py), then
the machine-dependent defaults and the checks of settings against each other."""

from __future__ import annotations

import os
import sys
import tomllib

from appdctl.protocol import default_socket_path

from .config import BY_NAME, SETTINGS, ConfigError, Settings
from .config_values import _short

# Options of `appd start` that name the file itself are not read from the file.
_NOT_IN_FILE = {"config"}


def _default_log_format() -> str:
    return "console" if sys.stderr.isatty() else "json"


def _apply(values: dict, sources: dict, name: str, raw, source: str) -> None:
    setting = BY_NAME[name]
    try:
        values[name] = setting.parse(raw)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        where = f" (from {source})" if source else ""
        raise ConfigError(f"invalid {name}{where}: {exc}") from None
    sources[name] = source


def read_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # e.g. a comment saved as Latin-1: TOML is UTF-8
        raise ConfigError(f"config file {path} is not UTF-8 (TOML must be): byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # e.g. nesting too deep, a huge number
        raise ConfigError(f"config file {path} cannot be read: {type(exc).__name__}: "
                          f"{str(exc)[:200]}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    # Accept both a flat file and one with an [appd] table.
    if isinstance(data.get("appd"), dict):
        data = data["appd"]
    return data


def load_settings(flags: dict | None = None, environ=os.environ) -> Settings:
    """Build the effective settings. `flags` maps setting names to values given on the command line.
    gunicorn's layers (WEB_CONCURRENCY, gunicorn.conf.py, GUNICORN_CMD_ARGS) sit in between:
    see daemon/gunicorn.py for the order."""
    from . import gunicorn, gunicorn_sources
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    notes: list[str] = []
    for variable, name in gunicorn.ENV_DEFAULTS.items():  # WEB_CONCURRENCY: below every file
        if environ.get(variable):
            _apply(values, sources, name, environ[variable], variable)
    config_path = (flags.get("config") or environ.get(BY_NAME["config"].env)
                   or gunicorn_sources.cmd_args_config(environ) or gunicorn_sources.found_config())
    if config_path:
        _apply(values, sources, "config", config_path, _config_source(flags, environ))
        if gunicorn_sources.is_python_config(config_path):
            _apply_translation(values, sources, notes, gunicorn_sources.settings_from_python(config_path))
        else:
            for name, raw in read_file(config_path).items():
                if name not in BY_NAME or name in _NOT_IN_FILE:
                    raise ConfigError(f"unknown setting {_short(name)} in {config_path}")
                _apply(values, sources, name, raw, config_path)
    _apply_translation(values, sources, notes, gunicorn_sources.cmd_args(environ))
    for setting in SETTINGS:
        if setting.env in environ and setting.name != "config":
            _apply(values, sources, setting.name, environ[setting.env], setting.env)
    for name, raw in flags.items():
        if name != "config":
            _apply(values, sources, name, raw, BY_NAME[name].flag)
    _finish(values)
    _gthread_when_threaded(values, sources, notes)
    return Settings(values, sources, notes)


def _config_source(flags: dict, environ) -> str:
    if "config" in flags:
        return "command line"
    if BY_NAME["config"].env in environ:
        return "environment"
    return "GUNICORN_CMD_ARGS" if "GUNICORN_CMD_ARGS" in environ else "found in the current directory"


def _apply_translation(values: dict, sources: dict, notes: list, translation) -> None:
    """Apply settings read in gunicorn's forms; every one appd cannot honour is refused, one line each."""
    if translation is None:
        return
    if translation.refused:
        raise ConfigError("gunicorn settings appd cannot honour:\n  " + "\n  ".join(translation.refused))
    notes.extend(f"not needed under appd: {line}" for line in translation.notes)
    for name, raw in translation.values.items():
        if name not in BY_NAME or name in _NOT_IN_FILE:
            raise ConfigError(f"unknown setting {name!r} in {translation.sources[name]}")
        _apply(values, sources, name, raw, translation.sources[name])


def _gthread_when_threaded(values: dict, sources: dict, notes: list) -> None:
    """gunicorn's rule: threads > 1 with no worker_class chosen means gthread."""
    if values["threads"] > 1 and values["worker_class"] == "sync" and sources["worker_class"] == "default":
        values["worker_class"], sources["worker_class"] = "gthread", "threads > 1 (gunicorn's rule)"
        notes.append("worker_class = gthread because threads > 1 (as gunicorn does)")


def _finish(values: dict) -> None:
    """Fill the defaults that depend on the machine, and check settings against each other."""
    if values["control_socket"] is None:
        values["control_socket"] = default_socket_path()
    if values["chdir"] is None:
        values["chdir"] = os.getcwd()
    if values["log_format"] is None:
        values["log_format"] = _default_log_format()
    if values["workers"] > values["max_workers"]:
        raise ConfigError(f"invalid workers: {values['workers']} is above max_workers {values['max_workers']}")
    if values["worker_class"] == "command" and not values["command"]:
        raise ConfigError("invalid command: worker_class = command needs a command to run")
    if values["worker_class"] == "asgi":
        _refuse_what_asgi_lacks(values)


# What the asgi worker does not do yet: refused by name rather than ignored.
_NOT_IN_ASGI = {"certfile": "TLS", "proxy_protocol": "the PROXY protocol",
                "pre_request": "WSGI request hooks", "post_request": "WSGI request hooks"}


def _refuse_what_asgi_lacks(values: dict) -> None:
    for name, what in _NOT_IN_ASGI.items():
        if values.get(name) not in (None, "", "off", False):
            raise ConfigError(f"invalid {name}: the asgi worker does not support {what} yet "
                              "(terminate TLS and PROXY in front of appd, or use gthread)")
