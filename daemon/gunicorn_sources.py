"""Where gunicorn-named settings come from: the Python config file (executed,
never importing gunicorn; found as ./gunicorn.conf.py), gunicorn's flag
spellings on appd's command line, and GUNICORN_CMD_ARGS. Each source yields
gunicorn names, translated by gunicorn.translate() through the one table."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shlex
import traceback

from .gunicorn import _HOOKS, BY_GUNICORN, DEFAULT_FILE, HONOURED, ROWS, Row, Translation, translate

MODULE_PREFIX = "python:"
# Setting names a gunicorn.conf.py shares with module-level helpers too often to be read as appd's own.
_NOT_APPD_EXTRAS = {"config", "app", "command", "python"}

# --- the Python config file ---

def found_config() -> str | None:
    """./gunicorn.conf.py when it exists, as gunicorn finds its default file."""
    return DEFAULT_FILE if os.path.isfile(DEFAULT_FILE) else None


def read_python_config(path: str) -> dict:
    """Execute a gunicorn.conf.py (never importing gunicorn) and return the settings it sets.
    Callables (hooks) become `/abs/path.py:name` specs, which appd resolves by running the
    file again in the process that calls them (as gunicorn's re-exec'd master does)."""
    from .config import BY_NAME, ConfigError
    if path.startswith(MODULE_PREFIX):  # gunicorn's -c python:package.module
        namespace, where = _import(path[len(MODULE_PREFIX):]), path[len(MODULE_PREFIX):]
    else:
        namespace, where = _execute(path), os.path.abspath(path)
    settings = {}
    for name, value in namespace.items():
        known = name in BY_GUNICORN or (name in BY_NAME and name not in _NOT_APPD_EXTRAS)
        if name.startswith("_") or not known:
            continue  # gunicorn ignores module-level helpers too
        if callable(value):
            if name not in _HOOKS and BY_GUNICORN.get(name, Row(name)).kind == HONOURED:
                raise ConfigError(f"{name} in {path} is a callable; it must be a value")
            value = f"{where}:{name}"
        settings[name] = value
    return settings


def is_python_config(path: str) -> bool:
    return path.endswith(".py") or path.startswith(MODULE_PREFIX)


def _import(module_name: str) -> dict:
    from .config import ConfigError
    try:
        return vars(importlib.import_module(module_name))
    except BaseException as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise ConfigError(f"config module {module_name} failed to import: {last}") from None


def _execute(path: str) -> dict:
    from .config import ConfigError
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("__config__", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # a config file may even call sys.exit
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise ConfigError(f"config file {path} failed to run: {last}") from None
    return vars(module)


def settings_from_python(path: str) -> Translation:
    return translate(read_python_config(path), path)


# --- command-line spellings and GUNICORN_CMD_ARGS ---

def _add_flag(parser, row: Row, flags: list, dest: str) -> None:
    if row.action in ("store_true", "append"):
        parser.add_argument(*flags, dest=dest, action=row.action, default=None,
                            help=argparse.SUPPRESS)
    elif row.action == "store_const":
        parser.add_argument(*flags, dest=dest, action="store_const", const=False, default=None,
                            help=argparse.SUPPRESS)
    elif row.name == "proxy_protocol":
        parser.add_argument(*flags, dest=dest, nargs="?", const="auto", default=None,
                            help=argparse.SUPPRESS)
    else:
        parser.add_argument(*flags, dest=dest, default=None, help=argparse.SUPPRESS)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add gunicorn's spellings that appd's own flags do not already cover (hidden from --help)."""
    taken = set(parser._option_string_actions)
    for row in ROWS:
        extra = [flag for flag in row.flags if flag not in taken]
        if extra:
            _add_flag(parser, row, extra, "gunicorn." + row.name)


def flags_from(namespace: argparse.Namespace) -> dict:
    """The gunicorn-spelled flags given on the command line, by gunicorn name."""
    return {dest[len("gunicorn."):]: value for dest, value in vars(namespace).items()
            if dest.startswith("gunicorn.") and value is not None
            and dest != "gunicorn.check_config"}  # the CLI runs `appd check` for it


def parse_cmd_args(text: str) -> dict:
    """GUNICORN_CMD_ARGS, parsed as gunicorn parses it; returns gunicorn-named values."""
    from .config import ConfigError
    parser = _CmdArgsParser(prog="GUNICORN_CMD_ARGS", add_help=False)
    for row in ROWS:
        if row.flags:
            _add_flag(parser, row, list(row.flags), row.name)
    try:
        namespace = parser.parse_args(shlex.split(text))
    except (ValueError, _UsageError) as exc:
        raise ConfigError(f"GUNICORN_CMD_ARGS: {exc}") from None
    return {k: v for k, v in vars(namespace).items() if v is not None}


class _UsageError(Exception):
    pass


class _CmdArgsParser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def cmd_args(environ) -> Translation | None:
    """GUNICORN_CMD_ARGS as appd settings; its -c (if any) was used to find the file."""
    text = environ.get("GUNICORN_CMD_ARGS")
    if not text:
        return None
    given = parse_cmd_args(text)
    given.pop("config", None)
    return translate(given, "GUNICORN_CMD_ARGS")


def cmd_args_config(environ) -> str | None:
    """The config file GUNICORN_CMD_ARGS names with -c, as gunicorn honours it."""
    text = environ.get("GUNICORN_CMD_ARGS")
    return parse_cmd_args(text).get("config") if text else None
