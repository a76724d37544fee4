"""Settings: one table, four sources (defaults < TOML file < APPD_* env <
flags), derived flag and variable names, and errors that name the setting,
the bad value and where it came from. Plus listener address parsing."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from appd import cli, config
from appd.config import ConfigError, SETTINGS
from appd.listeners import parse_address
from conftest import APPD, APPS


def load_with_flags(argv: list[str], environ: dict | None = None) -> config.Config:
    """What `appd start ARGV` would load: the real argument parser, then config.load."""
    namespace = cli.build_parser().parse_args(["start", *argv])
    return config.load(cli.flags_from(namespace), environ or {})


def write_toml(tmp_path, text: str, name: str = "appd.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- defaults and precedence ---

def test_defaults_come_from_the_settings_table():
    cfg = config.load({}, environ={})
    for setting in SETTINGS:
        assert cfg.sources[setting.name] == "default"
    assert cfg.workers == 2 and cfg.bind == ["127.0.0.1:8000"] and cfg.timeout == 30.0
    assert cfg.max_requests == 0 and cfg.preload_app is False and cfg.app is None
    assert cfg.chdir == os.getcwd(), "chdir defaults to where appd started"
    assert cfg.control_socket  # a machine-dependent default is filled in
    assert cfg.log_format in ("console", "json")


@pytest.mark.parametrize("layers, workers, source", [
    ((), 2, "default"),
    (("file",), 3, "FILE"),
    (("file", "env"), 4, "APPD_WORKERS"),
    (("file", "env", "flag"), 5, "--workers"),
    (("env", "flag"), 5, "--workers"),
    (("file", "flag"), 5, "--workers"),
])
def test_later_sources_win(tmp_path, layers, workers, source):
    path = write_toml(tmp_path, "workers = 3\n")
    environ, argv = {}, []
    if "file" in layers:
        argv += ["--config", path]
    if "env" in layers:
        environ["APPD_WORKERS"] = "4"
    if "flag" in layers:
        argv += ["-w", "5"]
    cfg = load_with_flags(argv, environ)
    assert cfg.workers == workers
    assert cfg.sources["workers"] == (path if source == "FILE" else source)


def test_each_setting_keeps_the_source_that_set_it(tmp_path):
    path = write_toml(tmp_path, 'workers = 3\ntimeout = 5\nmax_requests = 7\nbacklog = 100\n')
    cfg = load_with_flags(["-c", path, "--workers", "5"], {"APPD_TIMEOUT": "6", "APPD_WORKERS": "4"})
    assert (cfg.workers, cfg.sources["workers"]) == (5, "--workers")
    assert (cfg.timeout, cfg.sources["timeout"]) == (6.0, "APPD_TIMEOUT")
    assert (cfg.max_requests, cfg.sources["max_requests"]) == (7, path)
    assert (cfg.backlog, cfg.sources["backlog"]) == (100, path)
    assert (cfg.graceful_timeout, cfg.sources["graceful_timeout"]) == (30.0, "default")


def test_config_file_from_the_environment_and_flag_wins(tmp_path):
    from_env = write_toml(tmp_path, "workers = 3\n", "env.toml")
    from_flag = write_toml(tmp_path, "workers = 6\n", "flag.toml")
    assert config.load({}, {"APPD_CONFIG": from_env}).workers == 3
    assert load_with_flags(["-c", from_flag], {"APPD_CONFIG": from_env}).workers == 6


def test_config_file_may_use_an_appd_table(tmp_path):
    path = write_toml(tmp_path, '[appd]\nworkers = 4\nbind = ["127.0.0.1:9000", "unix:/tmp/x.sock"]\n')
    cfg = config.load({"config": path}, {})
    assert cfg.workers == 4 and cfg.bind == ["127.0.0.1:9000", "unix:/tmp/x.sock"]


def test_repeated_bind_flags_and_comma_separated_env():
    assert load_with_flags(["-b", "127.0.0.1:1", "-b", "unix:/tmp/a.sock"]).bind == \
        ["127.0.0.1:1", "unix:/tmp/a.sock"]
    assert config.load({}, {"APPD_BIND": "127.0.0.1:1, [::1]:2"}).bind == ["127.0.0.1:1", "[::1]:2"]


# --- every setting, every form ---

# One valid raw (string) value per setting and what it parses to. A setting
# added to the table without an entry here fails test_every_setting_has_a_sample.
SAMPLES = {
    "config": None,  # exercised by the tests above (it names a file to read)
    "app": ("core_probe:app", "core_probe:app"),
    "bind": ("127.0.0.1:9001", ["127.0.0.1:9001"]),
    "workers": ("3", 3),
    "max_workers": ("8", 8),
    "metrics_bind": ("127.0.0.1:9101", "127.0.0.1:9101"),
    "statsd_host": ("127.0.0.1:8125", "127.0.0.1:8125"),
    "statsd_prefix": ("shop", "shop"),
    "max_surge": ("1", 1),
    "max_worker_memory": ("512M", 512 * 1024 ** 2),
    "max_worker_lifetime": ("3600", 3600.0),
    "worker_class": ("gthread", "gthread"),
    "threads": ("4", 4),
    "command": ("./server --flag 'two words'", ["./server", "--flag", "two words"]),
    "ready_delay": ("0.5", 0.5),
    "timeout": ("12.5", 12.5),
    "graceful_timeout": ("7", 7.0),
    "drain_delay": ("5", 5.0),
    "probation": ("10", 10.0),
    "canary_workers": ("1", 1),
    "rollback_error_rate": ("0.1", 0.1),
    "rollback_min_requests": ("50", 50),
    "boot_timeout": ("9", 9.0),
    "ready_check": ("/healthz", "/healthz"),
    "max_requests": ("100", 100),
    "max_requests_jitter": ("10", 10),
    "preload_app": ("true", True),
    "backlog": ("64", 64),
    "keepalive": ("5", 5.0),
    "header_timeout": ("3", 3.0),
    "limit_request_line": ("1000", 1000),
    "limit_request_fields": ("20", 20),
    "limit_request_field_size": ("300", 300),
    "control_socket": ("/tmp/appd-test/ctl.sock", "/tmp/appd-test/ctl.sock"),
    "control_socket_mode": ("0660", 0o660),
    "unix_socket_mode": ("0660", 0o660),
    "worker_connections": ("50", 50),
    "factory": ("true", True),
    "websocket_drain_timeout": ("2.5", 2.5),
    "control_socket_group": ("staff", "staff"),
    "control_allow_uids": ("1000,1001", [1000, 1001]),
    "control_allow_gids": ("50", [50]),
    "python": ("/usr/bin/python3", "/usr/bin/python3"),
    "chdir": ("/srv/app/current", "/srv/app/current"),
    "pidfile": ("/run/appd.pid", "/run/appd.pid"),
    "log_format": ("json", "json"),
    "log_level": ("warning", "warning"),
    "access_log": ("/var/log/appd/access.log", "/var/log/appd/access.log"),
    "error_log": ("/var/log/appd/error.log", "/var/log/appd/error.log"),
    "post_fork": ("hooks:post_fork", "hooks:post_fork"),
    "worker_exit": ("hooks:worker_exit", "hooks:worker_exit"),
    "on_ready": ("hooks:on_ready", "hooks:on_ready"),
    "forwarded_allow_ips": ("10.0.0.0/8,127.0.0.1", ["10.0.0.0/8", "127.0.0.1"]),
    "secure_scheme_headers": ("X-FORWARDED-PROTO=https", {"X-FORWARDED-PROTO": "https"}),
    "forwarder_headers": ("SCRIPT_NAME", ["SCRIPT_NAME"]),
    "proxy_protocol": ("v2", "v2"),
    "proxy_allow_ips": ("10.1.2.3", ["10.1.2.3"]),
    "user": ("nobody", "nobody"),
    "group": ("nogroup", "nogroup"),
    "umask": ("027", 0o27),
    "initgroups": ("true", True),
    "raw_env": ("DJANGO_SETTINGS_MODULE=site.settings", ["DJANGO_SETTINGS_MODULE=site.settings"]),
    "pythonpath": ("/srv/app/lib,/srv/app", "/srv/app/lib,/srv/app"),
    "proc_name": ("shop", "shop"),
    "access_log_format": ('%(h)s "%(r)s" %(s)s', '%(h)s "%(r)s" %(s)s'),
    "capture_output": ("true", True),
    "logconfig_dict": ('{"version": 1, "root": {"level": "INFO"}}', {"version": 1, "root": {"level": "INFO"}}),
    "certfile": ("/etc/ssl/site.pem", "/etc/ssl/site.pem"),
    "keyfile": ("/etc/ssl/site.key", "/etc/ssl/site.key"),
    "ca_certs": ("/etc/ssl/ca.pem", "/etc/ssl/ca.pem"),
    "cert_reqs": ("2", 2),
    "ciphers": ("ECDHE+AESGCM", "ECDHE+AESGCM"),
    **{hook: (f"hooks:{hook}", f"hooks:{hook}") for hook in (
        "on_starting", "when_ready", "on_reload", "pre_fork", "post_worker_init", "pre_request",
        "post_request", "child_exit", "worker_int", "worker_abort", "nworkers_changed", "pre_exec",
        "on_exit")},
}
SETTABLE = [s for s in SETTINGS if SAMPLES.get(s.name)]


def test_every_setting_has_a_sample():
    assert set(SAMPLES) == {s.name for s in SETTINGS}


def test_names_are_derived_and_every_setting_has_help():
    flags, envs = set(), set()
    for setting in SETTINGS:
        assert setting.flag == "--" + setting.name.replace("_", "-")
        assert setting.env == "APPD_" + setting.name.upper()
        assert setting.help and len(setting.help) > 10, setting.name
        flags.add(setting.flag)
        envs.add(setting.env)
    assert len(flags) == len(envs) == len(SETTINGS)
    shorts = {s.short: s.name for s in SETTINGS if s.short}
    assert {"-b": "bind", "-w": "workers", "-c": "config"}.items() <= shorts.items()


def test_start_help_lists_every_flag_and_variable():
    for command in ("start", "check"):
        result = subprocess.run([APPD, command, "--help"], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 0, result.stderr
        for setting in SETTINGS:
            assert setting.flag in result.stdout, (command, setting.flag)
            assert f"[{setting.env}]" in result.stdout, (command, setting.env)


@pytest.mark.parametrize("setting", SETTABLE, ids=lambda s: s.name)
def test_every_setting_loads_from_env_file_and_flag(tmp_path, setting):
    raw, expected = SAMPLES[setting.name]
    from_env = config.load({}, {setting.env: raw})
    assert getattr(from_env, setting.name) == expected
    assert from_env.sources[setting.name] == setting.env

    if setting.parse is config._bool:
        argv = [setting.flag]
    else:
        argv = [setting.flag, raw]
    from_flag = load_with_flags(argv)
    assert getattr(from_flag, setting.name) == expected
    assert from_flag.sources[setting.name] == setting.flag

    toml_value = expected if isinstance(expected, (list, bool, int, float)) and setting.name not in (
        "control_socket_mode", "unix_socket_mode") else raw
    import json  # TOML accepts JSON-style scalars and arrays of them
    path = write_toml(tmp_path, f"{setting.name} = {json.dumps(toml_value)}\n")
    from_file = config.load({"config": path}, {})
    assert getattr(from_file, setting.name) == expected
    assert from_file.sources[setting.name] == path


def test_boolean_flag_can_be_negated(tmp_path):
    path = write_toml(tmp_path, "preload_app = true\n")
    assert load_with_flags(["-c", path]).preload_app is True
    assert load_with_flags(["-c", path, "--no-preload-app"]).preload_app is False


# --- errors name the setting, the value and the source ---

@pytest.mark.parametrize("where, name, raw, shown", [
    ("flag", "workers", "zero", "'zero'"),
    ("flag", "workers", "0", "0 is below the minimum 1"),
    ("flag", "control_socket_mode", "999", "'999'"),
    ("env", "timeout", "soon", "'soon'"),
    ("env", "preload_app", "maybe", "'maybe'"),
    ("env", "worker_class", "eventlet", "'eventlet'"),
    ("env", "max_requests", "-1", "-1 is below the minimum 0"),
    ("file", "log_format", '"xml"', "'xml'"),
    ("file", "bind", '["localhost"]', "'localhost'"),
    ("file", "workers", "true", "True"),
    ("file", "post_fork", '"nocolon"', "'nocolon'"),
    ("file", "graceful_timeout", "-3", "-3"),
])
def test_invalid_value_names_setting_value_and_source(tmp_path, where, name, raw, shown):
    setting = config.BY_NAME[name]
    if where == "flag":
        expected_source = setting.flag
        load = lambda: load_with_flags([setting.flag, raw])  # noqa: E731
    elif where == "env":
        expected_source = setting.env
        load = lambda: config.load({}, {setting.env: raw})  # noqa: E731
    else:
        expected_source = write_toml(tmp_path, f"{name} = {raw}\n")
        load = lambda: config.load({"config": expected_source}, {})  # noqa: E731
    with pytest.raises(ConfigError) as error:
        load()
    message = str(error.value)
    assert name in message and shown in message and expected_source in message, message


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = write_toml(tmp_path, "workers = 2\nwrokers = 3\n")
    with pytest.raises(ConfigError, match="wrokers") as error:
        config.load({"config": path}, {})
    assert path in str(error.value)


def test_config_key_inside_the_file_is_refused(tmp_path):
    path = write_toml(tmp_path, 'config = "other.toml"\n')
    with pytest.raises(ConfigError, match="config"):
        config.load({"config": path}, {})


def test_unreadable_config_files(tmp_path):
    broken = write_toml(tmp_path, "workers = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as error:
        config.load({"config": broken}, {})
    assert broken in str(error.value)
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="does not exist") as error:
        config.load({}, {"APPD_CONFIG": missing})
    assert missing in str(error.value)


def test_settings_are_checked_against_each_other():
    with pytest.raises(ConfigError, match="workers.*10.*max_workers"):
        config.load({"workers": "10", "max_workers": "4"}, {})
    with pytest.raises(ConfigError, match="command"):
        config.load({"worker_class": "command"}, {})


@pytest.mark.parametrize("case", ["flag", "env", "file"])
def test_start_with_invalid_config_exits_2_and_starts_nothing(tmp_path, case):
    control = tmp_path / "ctl" / "ctl.sock"
    argv = [APPD, "start", "--control-socket", str(control), "--bind", "127.0.0.1:0",
            "--pidfile", str(tmp_path / "appd.pid")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPD_")}
    if case == "flag":
        argv += ["--timeout", "forever"]
        expected = ["timeout", "'forever'", "--timeout"]
    elif case == "env":
        env["APPD_WORKERS"] = "lots"
        expected = ["workers", "'lots'", "APPD_WORKERS"]
    else:
        path = write_toml(tmp_path, 'worker_class = "eventlet"\n')
        argv += ["-c", path]
        expected = ["worker_class", "'eventlet'", path]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, cwd=APPS)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert all(part in result.stderr for part in expected), result.stderr
    assert result.stderr.startswith("appd: invalid configuration:")
    assert not control.parent.exists(), "nothing may be created for an invalid config"
    assert not (tmp_path / "appd.pid").exists()


# --- listener addresses ---

@pytest.mark.parametrize("spec, family, kind, target", [
    ("127.0.0.1:8000", socket.AF_INET, "tcp", ("127.0.0.1", 8000)),
    ("0.0.0.0:0", socket.AF_INET, "tcp", ("0.0.0.0", 0)),
    (":8080", socket.AF_INET, "tcp", ("0.0.0.0", 8080)),
    ("localhost:65535", socket.AF_INET, "tcp", ("localhost", 65535)),
    ("[::1]:9000", socket.AF_INET6, "tcp", ("::1", 9000)),
    ("[::]:80", socket.AF_INET6, "tcp", ("::", 80)),
    ("unix:/run/appd/app.sock", socket.AF_UNIX, "unix", "/run/appd/app.sock"),
    ("unix:relative.sock", socket.AF_UNIX, "unix", "relative.sock"),
    ("fd://3", 0, "fd", 3),
])
def test_bind_addresses_parse(spec, family, kind, target):
    address = parse_address(spec)
    assert (address.family, address.kind, address.target, address.spec) == (family, kind, target, spec)


@pytest.mark.parametrize("spec", [
    "localhost", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "127.0.0.1:-1",
    "[::1]9000", "[::1]", "::1", "::1:8000", "unix:", "fd://", "fd://three",
])
def test_bad_bind_addresses_are_refused_by_name(spec):
    with pytest.raises(ValueError) as error:
        parse_address(spec)
    assert repr(spec) in str(error.value)
    with pytest.raises(ConfigError) as error:
        config.load({}, {"APPD_BIND": f"127.0.0.1:1,{spec}"})
    message = str(error.value)
    assert "bind" in message and spec in message and "APPD_BIND" in message


@pytest.mark.parametrize("flags, named", [({"certfile": "/etc/ssl/c.pem"}, "certfile"),
                                          ({"proxy_protocol": "v1"}, "proxy_protocol"),
                                          ({"post_request": "hooks:after"}, "post_request")])
def test_asgi_worker_refuses_what_it_does_not_do_by_name(flags, named):
    with pytest.raises(config.ConfigError, match=f"invalid {named}: the asgi worker does not support"):
        config.load({"worker_class": "asgi", **flags}, environ={})
    assert config.load({"worker_class": "gthread", **flags}, environ={}).worker_class == "gthread"


# --- the frozen Settings object, shared by the daemon and every master ---

def test_settings_are_frozen_and_read_alike_by_attribute_and_key():
    import msgpack
    cfg = config.load({"workers": "3"}, environ={})
    with pytest.raises(AttributeError, match="frozen"):
        cfg.workers = 5
    assert cfg.workers == cfg["workers"] == cfg.get("workers") == 3
    assert "workers" in cfg and "no_such_setting" not in cfg
    with pytest.raises(AttributeError):
        cfg.no_such_setting
    # What a master receives: the values over msgpack, rebuilt into the same type.
    sent = msgpack.unpackb(msgpack.packb(cfg.values), raw=False)
    received = config.Settings(sent)
    assert received == cfg and received.bind == cfg.bind
    reloaded = received.updated({"workers": 4})
    assert (reloaded.workers, received.workers) == (4, 3), "updated() leaves the original alone"


def test_a_setting_the_daemon_did_not_send_reads_as_its_default():
    """A daemon older than the master's code sends fewer settings; attribute access
    still answers, while mapping access says what was actually sent."""
    received = config.Settings({"workers": 2})
    assert received.max_surge == config.BY_NAME["max_surge"].default
    assert received.get("max_surge") is None and "max_surge" not in received
