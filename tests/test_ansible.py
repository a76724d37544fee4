"""deploy/ansible: the appd.fleet collection rolls a release out over three
appd instances (three inventory hosts, ansible_connection=local, each its own
control socket and port), one at a time; a broken release stops at the first
host, which rolled back, and the other two keep serving the old code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import APPDCTL, ROOT
from test_upgrade import start_myapp, write_app

pytest.importorskip("ansible")
PLAYBOOK = ROOT / "deploy/ansible/ansible_collections/appd/fleet/playbooks/rolling_upgrade.yml"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"


def inventory(tmp_path: Path, fleet: list) -> Path:
    lines = ["[appd]"] + [
        f"web{i} ansible_connection=local ansible_python_interpreter={sys.executable} "
        f"appd_socket={appd.socket} appdctl={APPDCTL}" for i, appd in enumerate(fleet, 1)]
    path = tmp_path / "hosts"
    path.write_text("\n".join(lines) + "\n")
    return path


def rollout(tmp_path: Path, hosts: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "deploy/ansible"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORKS": "1"}
    return subprocess.run([str(PLAYBOOK_BIN), "-i", str(hosts), str(PLAYBOOK)], capture_output=True,
                          text=True, timeout=240, env=env)


def test_rolling_upgrade_good_then_broken_release(start_appd, tmp_path):
    dirs = [tmp_path / f"release{i}" for i in range(3)]
    for directory in dirs:
        directory.mkdir()
        write_app(directory, '"v1"')
    fleet = [start_myapp(start_appd, directory, "-w", "1") for directory in dirs]
    hosts = inventory(tmp_path, fleet)

    for directory in dirs:
        write_app(directory, '"v2"')
    good = rollout(tmp_path, hosts)
    assert good.returncode == 0, good.stdout + good.stderr
    assert [appd.get("/")[2] for appd in fleet] == [b"v2\n"] * 3

    for directory in dirs:
        write_app(directory, '"v3"', prelude='raise RuntimeError("release 3 is broken")')
    broken = rollout(tmp_path, hosts)
    assert broken.returncode != 0, broken.stdout
    assert "rolled_back" in broken.stdout and "release 3 is broken" in broken.stdout, broken.stdout
    lasts = [appd.status()["last_operation"]["outcome"] for appd in fleet]
    assert lasts == ["rolled_back", "done", "done"], lasts  # web2 and web3 were never touched
    assert [appd.get("/")[2] for appd in fleet] == [b"v2\n"] * 3
