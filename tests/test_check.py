"""`appd check`: validate the config and import the app in a child process,
exactly as a worker would, without starting anything."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import APPD, APPS


def check(*args: str, env: dict | None = None, cwd=APPS) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APPD_")}
    return subprocess.run([APPD, "check", *args], capture_output=True, text=True, timeout=30,
                          env={**clean, **(env or {})}, cwd=cwd)


def test_check_starts_no_daemon(tmp_path):
    """Even with every option `appd start` would take, check only checks."""
    control = tmp_path / "run" / "ctl.sock"
    result = check("core_probe:app", "--bind", "127.0.0.1:0", "--control-socket", str(control),
                   "--pidfile", str(tmp_path / "appd.pid"))
    assert result.returncode == 0, result.stderr
    assert not control.parent.exists() and not (tmp_path / "appd.pid").exists()
    assert "daemon_started" not in result.stderr


def test_demo_app_checks_ok():
    result = check()
    assert result.returncode == 0, result.stderr
    assert "config ok" in result.stdout and "appd.demo:app" in result.stdout


@pytest.mark.parametrize("app", ["flaskapp:app", "core_probe:app", "hang:app"])
def test_apps_in_the_test_directory_check_ok(app):
    result = check(app)
    assert result.returncode == 0, result.stderr
    assert app in result.stdout


def test_app_is_imported_in_a_child_process_not_in_appd(tmp_path):
    marker = tmp_path / "import.pid"
    process = subprocess.Popen([APPD, "check", "core_probe:app"], cwd=APPS, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "CORE_IMPORT_PID_FILE": str(marker)})
    try:
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    imported_by = int(marker.read_text())
    assert imported_by != process.pid, "appd check must not import the app itself"


def test_passing_ready_check_is_reported():
    result = check("hang:app", "--ready-check", "/healthz")
    assert result.returncode == 0, result.stderr
    assert "/healthz answers 2xx" in result.stdout


def test_app_that_fails_to_import_exits_1_with_its_traceback():
    result = check("broken:app")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: broken deploy: this module cannot be imported" in result.stderr
    assert "broken:app failed to load" in result.stderr
    assert "config ok" not in result.stdout


@pytest.mark.parametrize("app, error", [
    ("no_such_module:app", "ModuleNotFoundError"),
    ("core_probe:missing", "has no attribute 'missing'"),
    ("core_probe:IMPORT_PID", "is not callable"),
])
def test_app_that_cannot_be_found_exits_1_naming_the_cause(app, error):
    result = check(app)
    assert result.returncode == 1
    assert error in result.stderr, result.stderr


def test_failing_ready_check_exits_1_naming_path_and_status():
    result = check("hang:app", "--ready-check", "/healthz", env={"UNHEALTHY": "1"})
    assert result.returncode == 1
    assert "/healthz" in result.stderr and "503" in result.stderr, result.stderr
    assert "config ok" not in result.stdout


def test_chdir_decides_where_the_app_is_imported_from(tmp_path):
    """From another directory the test app is not importable; --chdir fixes that."""
    assert check("core_probe:app", cwd=tmp_path).returncode == 1
    result = check("core_probe:app", "--chdir", str(APPS), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, env, named", [
    (["--workers", "none"], {}, ["workers", "'none'", "--workers"]),
    ([], {"APPD_BIND": "nowhere"}, ["bind", "'nowhere'", "APPD_BIND"]),
    (["--log-format", "xml"], {}, ["log_format", "'xml'", "--log-format"]),
])
def test_invalid_config_exits_1_naming_the_setting(args, env, named):
    result = check("core_probe:app", *args, env=env)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert all(part in result.stderr for part in named), result.stderr
    assert "config ok" not in result.stdout


def test_invalid_config_file_exits_1(tmp_path):
    path = tmp_path / "appd.toml"
    path.write_text("workers = 2\nunknown_setting = 1\n")
    result = check("-c", str(path))
    assert result.returncode == 1
    assert "unknown_setting" in result.stderr and str(path) in result.stderr


def test_app_that_hangs_at_import_is_bounded_by_boot_timeout():
    result = check("slow_import:app", "--boot-timeout", "1", env={"APP_IMPORT_SECONDS": "30"})
    assert result.returncode == 1
    assert "boot_timeout" in result.stderr
