"""deploy/: the Kubernetes example's settings parse and agree with its grace
period, and the container's command line starts appd as PID 1 of a new PID
namespace, where it reaps the orphans it is handed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import APPD, APPDCTL, ROOT, assert_no_leftovers, wait_until

K8S = ROOT / "deploy" / "k8s"


def example_settings(tmp_path: Path, **override) -> Path:
    """deploy/k8s/appd.toml, with `override` lines replacing its own (loopback ports here)."""
    from appd.config import BY_NAME
    lines = []
    for line in (K8S / "appd.toml").read_text().splitlines():
        name = line.split("=")[0].strip()
        if name in override:
            continue
        if name == "metrics_bind" and name not in BY_NAME:
            continue  # issue 18's listener, merged separately
        lines.append(line)
    lines += [f"{name} = {value}" for name, value in override.items()]
    path = tmp_path / "appd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_k8s_example_settings_parse_and_fit_the_grace_period(tmp_path):
    from appd import config
    cfg = config.load({"config": str(example_settings(tmp_path))}, {})
    assert cfg.drain_delay > 0 and cfg.max_surge == 1
    deployment = (K8S / "deployment.yaml").read_text()
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", deployment).group(1))
    assert grace >= cfg.drain_delay + cfg.graceful_timeout, (grace, cfg.drain_delay, cfg.graceful_timeout)
    assert "preStop" not in deployment.replace("No preStop", "")
    assert "/readyz" in deployment and "/livez" in deployment


def container_command() -> list[str]:
    """The Dockerfile's CMD, as the deployment also spells it."""
    cmd = re.search(r'^CMD (\[.*\])$', (ROOT / "deploy" / "Dockerfile").read_text(), re.M).group(1)
    argv = eval(cmd)  # a JSON-style list of strings
    deployment = (K8S / "deployment.yaml").read_text()
    assert f"command: {cmd}".replace("'", '"') in deployment.replace("'", '"'), "Dockerfile and Deployment differ"
    return argv


ORPHAN_APP = textwrap.dedent("""\
    import os, time

    def _orphan():
        # Double fork: the grandchild's parent exits at once, so PID 1 inherits it.
        child = os.fork()
        if child == 0:
            if os.fork() == 0:
                time.sleep(0.3)
                open(os.path.join(os.environ["MARKS"], str(time.monotonic_ns())), "w").close()
                os._exit(0)
            os._exit(0)
        os.waitpid(child, 0)

    _orphan()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "3")])
        return [b"ok\\n"]
    """)


def zombies(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
def test_container_command_starts_appd_as_pid1_which_reaps_orphans(tmp_path):
    (tmp_path / "orphans.py").write_text(ORPHAN_APP)
    marks = tmp_path / "marks"
    marks.mkdir()
    settings = example_settings(tmp_path, app='"orphans:app"', bind='["127.0.0.1:0"]', workers="2", drain_delay="0.2",
                                chdir=f'"{tmp_path}"', control_socket=f'"{tmp_path / "ctl.sock"}"')
    argv = container_command()
    argv = [APPD if a == "appd" else str(settings) if a == "/etc/appd/appd.toml" else a for a in argv]
    log = open(tmp_path / "appd.log", "wb")
    unshare = subprocess.Popen(["unshare", "--pid", "--fork", *argv], env={**os.environ, "MARKS": str(marks)},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = {unshare.pid}
    try:
        appd_pid = wait_until(lambda: psutil.Process(unshare.pid).children(), 10, message="appd")[0].pid
        seen.add(appd_pid)
        wait_until(lambda: len(list(marks.iterdir())) >= 2, 30, message="each worker's orphan to exit")
        seen |= {p.pid for p in psutil.Process(appd_pid).children(recursive=True)}
        wait_until(lambda: not zombies(appd_pid), 10, message=f"orphans reaped (zombies: {zombies(appd_pid)})")
        status = subprocess.run([APPDCTL, "--socket", str(tmp_path / "ctl.sock"), "status"],
                                capture_output=True, text=True, timeout=30)
        assert " pid 1 " in status.stdout, status.stdout  # appd is PID 1 in its namespace
        os.kill(appd_pid, signal.SIGTERM)
        assert unshare.wait(60) == 0, (tmp_path / "appd.log").read_text()
    finally:
        if unshare.poll() is None:
            os.killpg(unshare.pid, signal.SIGKILL)
            unshare.wait(10)
        log.close()
        assert_no_leftovers(seen)
