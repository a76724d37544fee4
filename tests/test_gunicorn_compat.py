"""gunicorn's config file, flag spellings, GUNICORN_CMD_ARGS and WEB_CONCURRENCY
map onto appd's settings through one table; what appd cannot honour is refused
one line per setting; `appd migrate` writes the equivalent appd.toml."""

from __future__ import annotations

import os
import subprocess
import tomllib

import pytest

from appd import config, gunicorn
from appd.access import Atoms, RequestLog, escape
from appd.cli import build_parser, flags_from
from appd.gunicorn_report import table_markdown
from appd.http.proxy import ProxyRules
from conftest import APPD

HOOKS_CONF = os.path.join(os.path.dirname(__file__), "gunicorn_configs", "hooks_everywhere.conf.py")


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def cli_flags(*argv: str) -> dict:
    return flags_from(build_parser().parse_args(["start", *argv]))


# --- the table ---

def test_every_gunicorn_setting_has_exactly_one_row():
    settings = pytest.importorskip("gunicorn.config", reason="gunicorn (the bench extra) is not installed")
    names = [setting.name for setting in settings.KNOWN_SETTINGS]
    rows = [row.name for row in gunicorn.ROWS]
    assert sorted(rows) == sorted(names)
    assert len(rows) == len(set(rows))


def test_every_row_names_an_appd_setting_or_says_why():
    for row in gunicorn.ROWS:
        if row.fate() == gunicorn.HONOURED:
            assert row.appd in config.BY_NAME, row.name
        else:
            assert len(row.reason()) > 15, row.name
    table = table_markdown()
    assert table.count("\n| `") == len(gunicorn.ROWS)
    assert f"{len(gunicorn.ROWS)} gunicorn settings:" in table


# --- the Python config file ---

def test_python_config_maps_gunicorn_names_and_ignores_helpers(tmp_path):
    path = write(tmp_path, "gunicorn.conf.py", "import multiprocessing\n"
                 "bind = '127.0.0.1:9100'\nworkers = 3\nworker_class = 'gunicorn.workers.gthread.ThreadWorker'\n"
                 "accesslog = '-'\nerrorlog = '/tmp/e.log'\nloglevel = 'critical'\nkeepalive = 4\n"
                 "pidfile = '/tmp/x.pid'\nhelper_value = 12\ndef post_fork(server, worker): pass\n"
                 "boot_timeout = 9\n")
    cfg = config.load({"config": path}, {})
    assert (cfg.bind, cfg.workers, cfg.worker_class, cfg.access_log, cfg.error_log, cfg.log_level,
            cfg.keepalive, cfg.pidfile, cfg.boot_timeout) == (
        ["127.0.0.1:9100"], 3, "gthread", "-", "/tmp/e.log", "error", 4.0, "/tmp/x.pid", 9.0)
    assert cfg.post_fork == f"{path}:post_fork"
    assert cfg.sources["workers"] == path


def test_settings_appd_cannot_honour_are_refused_one_line_each(tmp_path):
    path = write(tmp_path, "g.conf.py", "daemon = True\nreload = True\nworker_class = 'gevent'\n"
                 "reload_engine = 'auto'\nspew = False\n")  # the last two are gunicorn's defaults
    with pytest.raises(config.ConfigError) as error:
        config.load({"config": path}, {})
    lines = str(error.value).splitlines()[1:]
    assert [line.strip().split(" ")[0] for line in lines] == ["daemon", "reload", "worker_class"]
    assert "foreground" in lines[0] and "appdctl reload" in lines[1] and "gevent" in lines[2]
    result = subprocess.run([APPD, "start", "-c", path], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "daemon = True" in result.stderr


def test_not_applicable_settings_are_accepted_with_a_note(tmp_path):
    path = write(tmp_path, "g.conf.py", "worker_tmp_dir = '/dev/shm'\nthreads = 3\n")
    cfg = config.load({"config": path}, {})
    assert any("worker_tmp_dir" in note and "heartbeat" in note for note in cfg.notes)
    assert cfg.worker_class == "gthread"  # gunicorn's rule: threads > 1 means gthread


def test_a_config_file_that_raises_is_reported(tmp_path):
    path = write(tmp_path, "g.conf.py", "workers = undefined_name\n")
    with pytest.raises(config.ConfigError, match="failed to run: NameError"):
        config.load({"config": path}, {})


def test_gunicorn_conf_py_in_the_current_directory_is_found(tmp_path, monkeypatch):
    write(tmp_path, "gunicorn.conf.py", "workers = 5\n")
    monkeypatch.chdir(tmp_path)
    cfg = config.load({}, {})
    assert cfg.workers == 5 and cfg.config == "gunicorn.conf.py"


# --- precedence: WEB_CONCURRENCY < file < GUNICORN_CMD_ARGS < APPD_* < flags ---

def test_precedence_of_gunicorn_layers(tmp_path):
    path = write(tmp_path, "g.conf.py", "workers = 3\ntimeout = 50\n")
    assert config.load({}, {"WEB_CONCURRENCY": "7"}).workers == 7
    assert config.load({"config": path}, {"WEB_CONCURRENCY": "7"}).workers == 3
    env = {"GUNICORN_CMD_ARGS": "-w 4 --keep-alive 9 --preload"}
    cfg = config.load({"config": path}, env)
    assert (cfg.workers, cfg.keepalive, cfg.preload_app, cfg.timeout) == (4, 9.0, True, 50.0)
    assert cfg.sources["workers"] == "GUNICORN_CMD_ARGS"
    assert config.load({"config": path}, {**env, "APPD_WORKERS": "5"}).workers == 5
    assert config.load({"config": path, "workers": "6"}, {**env, "APPD_WORKERS": "5"}).workers == 6


def test_gunicorn_cmd_args_refusals_and_mistakes_are_named():
    with pytest.raises(config.ConfigError, match="daemon = True .from GUNICORN_CMD_ARGS"):
        config.load({}, {"GUNICORN_CMD_ARGS": "--daemon"})
    with pytest.raises(config.ConfigError, match="GUNICORN_CMD_ARGS: unrecognized"):
        config.load({}, {"GUNICORN_CMD_ARGS": "--no-such-flag"})


# --- gunicorn's flag spellings on appd's command line ---

def test_gunicorn_flag_spellings(tmp_path):
    flags = cli_flags("-k", "gthread", "--keep-alive", "7", "--access-logfile", "-", "--error-logfile",
                      "/tmp/e.log", "-e", "A=1", "-e", "B=2", "-n", "shop", "-u", "nobody", "-g", "nogroup",
                      "--pid", "/tmp/p.pid", "--preload", "--forwarded-allow-ips", "*", "--certfile", "c.pem",
                      "--keyfile", "k.pem", "--capture-output", "--log-level", "debug", "--max-requests", "9",
                      "--chdir", str(tmp_path), "--worker-connections", "10", "-m", "022", "--proxy-protocol",
                      "--limit-request-field_size", "100", "app:app")
    cfg = config.load(flags, {})
    assert (cfg.worker_class, cfg.keepalive, cfg.access_log, cfg.error_log, cfg.raw_env, cfg.proc_name,
            cfg.user, cfg.group, cfg.pidfile, cfg.preload_app, cfg.forwarded_allow_ips, cfg.certfile,
            cfg.keyfile, cfg.capture_output, cfg.log_level, cfg.max_requests, cfg.chdir,
            cfg.worker_connections, cfg.umask, cfg.proxy_protocol, cfg.limit_request_field_size, cfg.app) == (
        "gthread", 7.0, "-", "/tmp/e.log", ["A=1", "B=2"], "shop", "nobody", "nogroup", "/tmp/p.pid",
        True, ["*"], "c.pem", "k.pem", True, "debug", 9, str(tmp_path), 10, 0o22, "auto", 100, "app:app")


def test_refused_flag_exits_2_with_its_reason_and_check_config_runs_check():
    result = subprocess.run([APPD, "start", "-D"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "daemon = True (from command line): appd runs in the foreground" \
        in result.stderr
    result = subprocess.run([APPD, "start", "--check-config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "config ok" in result.stdout


# --- appd migrate ---

def test_migrate_prints_an_equivalent_appd_toml(tmp_path):
    path = write(tmp_path, "gunicorn.conf.py", "bind = ['127.0.0.1:9000', 'unix:/run/shop.sock']\n"
                 "workers = 4\nthreads = 2\naccesslog = '-'\nsecure_scheme_headers = {'X-PROTO': 'https'}\n"
                 "logconfig_dict = {'version': 1, 'loggers': {'shop': {'level': 'INFO'}}}\n"
                 "daemon = True\nworker_tmp_dir = '/dev/shm'\npidfile = None\n"
                 "def when_ready(server):\n    pass\n")
    result = subprocess.run([APPD, "migrate", path], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    toml_path = write(tmp_path, "appd.toml", result.stdout)
    migrated = config.load({"config": toml_path}, {})
    original = {**tomllib.loads(result.stdout)}
    assert original["workers"] == 4 and migrated.bind == ["127.0.0.1:9000", "unix:/run/shop.sock"]
    assert migrated.logconfig_dict == {"version": 1, "loggers": {"shop": {"level": "INFO"}}}
    assert migrated.secure_scheme_headers == {"X-PROTO": "https"} and migrated.access_log == "-"
    assert migrated.when_ready == f"{path}:when_ready" and migrated.pidfile is None
    assert "daemon = True" in result.stderr and "worker_tmp_dir" in result.stderr


def test_migrate_of_a_real_world_config_carries_the_hooks(tmp_path):
    result = subprocess.run([APPD, "migrate", HOOKS_CONF], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "MARKERS": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    values = tomllib.loads(result.stdout)
    assert {"on_starting", "pre_request", "post_request", "child_exit", "nworkers_changed"} <= set(values)


# --- access log atoms, console and JSON ---

class _Resp:
    status, sent, headers = "201 Created", 42, [("Content-Type", "text/plain"), ("X-Trace", "t-1")]


def test_access_log_atoms_and_escaping():
    environ = {"REMOTE_ADDR": "203.0.113.5", "REQUEST_METHOD": "GET", "RAW_URI": '/a"b?x=1',
               "PATH_INFO": '/a"b', "QUERY_STRING": "x=1", "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_USER_AGENT": 'curl "evil"\n', "HTTP_REFERER": "https://r/", "HTTP_X_REQUEST_ID": "r-9",
               "HTTP_AUTHORIZATION": "Basic dXNlcjpwYXNz", "shop.tenant": "acme"}
    atoms = Atoms(environ, None, _Resp(), 0.0123)
    line = ('%(h)s %(l)s %(u)s "%(r)s" %(s)s %(b)s %(B)s "%(f)s" "%(a)s" %(D)s %(M)s %(L)s %(m)s %(U)s %(q)s '
            '%(H)s %({x-request-id}i)s %({x-trace}o)s %({shop.tenant}e)s %({missing}i)s') % atoms
    assert line == ('203.0.113.5 - user "GET /a\\"b?x=1 HTTP/1.1" 201 42 42 "https://r/" "curl \\"evil\\"\\x0a" '
                    '12300 12 0.012300 GET /a\\"b x=1 HTTP/1.1 r-9 t-1 acme -')
    assert escape("a\\b") == "a\\\\b"


def test_access_log_json_uses_the_format_atoms_as_keys(tmp_path):
    import json

    class W:
        cfg = config.Settings({"access_log": str(tmp_path / "a.log"), "log_format": "json",
                               "access_log_format": '%(h)s "%(r)s" %(s)s %({x-request-id}i)s'})
        log = view = None
    request_log = RequestLog(W())
    request_log.write({"REMOTE_ADDR": "10.0.0.1", "REQUEST_METHOD": "GET", "RAW_URI": "/",
                       "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_X_REQUEST_ID": "r-1"}, None, _Resp(), 0.001)
    record = json.loads((tmp_path / "a.log").read_text())
    assert {k: record[k] for k in ("h", "r", "s", "{x-request-id}i")} == {
        "h": "10.0.0.1", "r": "GET / HTTP/1.1", "s": "201", "{x-request-id}i": "r-1"}


# --- what a trusted proxy may say ---

def proxied(peer: str, **headers) -> dict:
    environ = {"REMOTE_ADDR": peer, "REMOTE_PORT": "5000", "wsgi.url_scheme": "http", "SCRIPT_NAME": "",
               "PATH_INFO": "/shop/cart", **{"HTTP_" + k: v for k, v in headers.items()}}
    ProxyRules(config.Settings({"forwarded_allow_ips": ["127.0.0.1", "10.0.0.0/8"],
                                "secure_scheme_headers": {"X-FORWARDED-PROTO": "https"},
                                "forwarder_headers": ["SCRIPT_NAME"]})).apply(environ)
    return environ


def test_forwarded_headers_are_believed_from_trusted_peers_only():
    trusted = proxied("10.1.2.3", X_FORWARDED_PROTO="https", X_FORWARDED_FOR="198.51.100.1, 10.9.9.9",
                      SCRIPT_NAME="/shop")
    assert (trusted["wsgi.url_scheme"], trusted["REMOTE_ADDR"], trusted["SCRIPT_NAME"], trusted["PATH_INFO"]) \
        == ("https", "198.51.100.1", "/shop", "/cart")
    forged = proxied("192.0.2.50", X_FORWARDED_PROTO="https", X_FORWARDED_FOR="1.2.3.4", SCRIPT_NAME="/x")
    assert (forged["wsgi.url_scheme"], forged["REMOTE_ADDR"], forged["SCRIPT_NAME"]) == ("http", "192.0.2.50", "")
    # the client cannot pose as a proxy hop behind a trusted one: the rightmost untrusted address wins
    spoof = proxied("127.0.0.1", X_FORWARDED_FOR="6.6.6.6, 203.0.113.8")
    assert spoof["REMOTE_ADDR"] == "203.0.113.8"


def test_readme_gunicorn_table_is_current():
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    start = readme.index("-->\n", readme.index("<!-- gunicorn table")) + 4
    end = readme.index("\n<!-- end of gunicorn table -->")
    assert readme[start:end] == table_markdown(), "run `python -m appd.gunicorn --table` and paste it"


def test_gunicorn_cmd_args_may_name_the_config_file(tmp_path):
    path = write(tmp_path, "g.conf.py", "workers = 3\n")
    cfg = config.load({}, {"GUNICORN_CMD_ARGS": f"-c {path} --timeout 12"})
    assert (cfg.config, cfg.workers, cfg.timeout) == (path, 3, 12.0)


def test_hook_adapters_answer_by_gunicorn_names():
    from appd.hooks import CfgView
    cfg = CfgView({"access_log": "-", "log_level": "info", "workers": 4, "raw_env": ["A=1"]})
    assert (cfg.accesslog, cfg.loglevel, cfg.workers, cfg.env, cfg.daemon) == ("-", "info", 4, {"A": "1"}, False)
    with pytest.raises(AttributeError):
        cfg.ssl_context


def test_config_as_a_python_module_and_gunicorn_env_defaults(tmp_path, monkeypatch):
    (tmp_path / "shop_gunicorn_conf.py").write_text("workers = 3\ndef when_ready(server):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config.load({"config": "python:shop_gunicorn_conf"}, {"FORWARDED_ALLOW_IPS": "10.0.0.0/8"})
    assert (cfg.workers, cfg.when_ready) == (3, "shop_gunicorn_conf:when_ready")
    assert (cfg.forwarded_allow_ips, cfg.sources["forwarded_allow_ips"]) == (["10.0.0.0/8"], "FORWARDED_ALLOW_IPS")
