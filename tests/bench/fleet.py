"""Scenario 14, Ansible (deploy/ansible): the appd.fleet collection's rolling
playbook over three local appd instances (three inventory hosts,
ansible_connection=local), as tests/test_ansible.py runs it: how long a good
release takes to reach all three, and what a broken release does (target:
stops at the first host, which rolled back; the other two keep the old code)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Context, Row  # noqa: E402
from servers import http_get  # noqa: E402

SCENARIO = "Ansible rolling upgrade, 3 local hosts (serial 1)"


def fleet(ctx: Context):
    try:
        import ansible  # noqa: F401  (the test extra)
    except ImportError:
        return [Row(SCENARIO, "rollout", None, None, "s", note="ansible-core not installed")], {}
    from test_ansible import inventory
    from test_upgrade import write_app
    releases = [ctx.dir(f"release{i}") for i in range(3)]
    for directory in releases:
        directory.mkdir(parents=True)
        write_app(directory, '"v1"')
    servers = [ctx.appd("myapp:app", 1, env={"APPD_CHDIR": str(d), "PYTHONDONTWRITEBYTECODE": "1"})
               for d in releases]
    scratch = ctx.dir("ansible")
    scratch.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server)
        hosts = inventory(scratch, servers)
        raw = {"good": _rollout(scratch, hosts, releases, servers, '"v2"', ""),
               "broken": _rollout(scratch, hosts, releases, servers, '"v3"',
                                  'raise RuntimeError("release 3 is broken")')}
    good, broken = raw["good"], raw["broken"]
    ctx.log(f"  ansible: good {good}, broken {broken}")
    return [Row(SCENARIO, "good release on all 3 hosts", good["seconds"], None, "s", "all serve v2",
                good["exit"] == 0 and good["serving"] == ["v2"] * 3, note=f"exit {good['exit']}"),
            Row(SCENARIO, "broken release: until the rollout stopped", broken["seconds"], None, "s",
                "stops at host 1 (rolled back), others keep v2",
                broken["exit"] != 0 and broken["outcomes"] == ["rolled_back", "done", "done"]
                and broken["serving"] == ["v2"] * 3,
                note=f"exit {broken['exit']}, outcomes {broken['outcomes']}, serving {broken['serving']}")], raw


def _rollout(scratch: Path, hosts: Path, releases, servers, body: str, prelude: str) -> dict:
    from test_ansible import rollout
    from test_upgrade import write_app
    for directory in releases:
        write_app(directory, body, prelude=prelude)
    t0 = time.monotonic()
    done = rollout(scratch, hosts)
    seconds = time.monotonic() - t0
    return {"seconds": seconds, "exit": done.returncode,
            "outcomes": [s.status()["last_operation"]["outcome"] for s in servers],
            "serving": [http_get(s.address, "/")[1].decode().strip() for s in servers]}

