"""Parts the daemon is made of, each carrying its own state: a generation
across a daemon re-exec, the one stale unix socket check, the listener set."""

import os
import socket

import msgpack
import pytest

from appd.generation import Generation, GenerationState
from appd.listeners import unix_socket_owner


def test_a_generation_exports_and_adopts_its_state_across_an_exec():
    before = Generation(7, os.getpid(), now=100.0)
    before.pid, before.extra_env = 4242, {"RELEASE": "7"}
    before.serve(130.0)
    before.tail.extend(["booted", "serving"])
    before.outcomes.record({"http|GET|5xx": [3], "http|GET|2xx": [7]}, {("500", "/pay"): 3}, ["crash"])
    entry = msgpack.unpackb(msgpack.packb(before.export_state(now=160.0)), raw=False)  # as reexec carries it
    after = Generation.from_state(entry, os.getpid(), now=5000.0, loop=None, on_message=None)
    assert after.state is GenerationState.SERVING and after.pid == 4242 and after.extra_env == {"RELEASE": "7"}
    assert after.started_mono == 5000.0 - 60.0 and after.ready_at == 5000.0 - 30.0, "ages, not clock readings"
    assert list(after.tail) == ["booted", "serving"] and after.channel is None
    assert after.outcomes.evidence() == before.outcomes.evidence(), "probation's counts survive a re-exec"


def test_generation_states_report_as_the_contract_spells_them():
    assert [str(s) for s in GenerationState] == ["starting", "ready", "serving", "draining", "exited", "failed",
                                                "canary", "standby"]
    generation = Generation(1, os.getpid(), now=0.0)
    generation.mark_ready()
    generation.exited("exit 1")
    assert generation.state == "failed", "it never served"


def test_the_stale_socket_check_unlinks_only_a_dead_socket(tmp_path):
    path = str(tmp_path / "s.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    assert unix_socket_owner(path) is None and not os.path.exists(path)
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        assert unix_socket_owner(path) == os.getpid() and os.path.exists(path)
    finally:
        live.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="is not a socket"):
        unix_socket_owner(str(tmp_path / "file"))
    os.symlink(tmp_path / "file", tmp_path / "link")
    with pytest.raises(OSError, match="symlink"):
        unix_socket_owner(str(tmp_path / "link"), "control socket path")
