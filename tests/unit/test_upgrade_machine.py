"""Upgrade (and its Rollout): cutover, rollback on boot failure, exit and
timeout, max_surge steps, a death after cutover; busy refusal. Fake
generations, fake clock: see fakes.py."""

from appdctl import protocol as codes

from appd.generation import GenerationState
from appd.messages import ToDaemon, ToMaster
from appd.operations import Scale
from appd.upgrade import Upgrade

from .fakes import Recorder, kinds, post, ready, sent, serving_daemon, tick, workers


def upgrade(daemon, **args):
    responder = Recorder()
    assert daemon.begin(Upgrade(daemon, responder, args))
    return responder, daemon.generations[-1]


def test_upgrade_cuts_over_when_the_new_generation_is_ready_then_drains_the_old():
    daemon, old = serving_daemon()
    responder, new = upgrade(daemon, env={"RELEASE": "2"})
    assert new.spawned_with["target"] == 2 and new.spawned_with["environment"]["RELEASE"] == "2"
    post(daemon, new, ToDaemon.WORKER_READY, pid=1, ready=1, target=2)
    assert kinds(old) == [] and responder.events[-1][0] == "booting"
    ready(daemon, new)
    assert daemon.serving is new and old.state == GenerationState.DRAINING
    assert sent(old)[-1]["t"] == ToMaster.DRAIN and sent(old)[-1]["sweep"] is False
    assert responder.result is None, "done only when the old generation is gone"
    daemon.generations.exited(old, "exit 0")
    assert responder.result["outcome"] == "done" and responder.result["generation"] == new.id
    assert daemon.operation is None and daemon.last_operation["op"] == "upgrade"
    assert daemon.generation_env == {"RELEASE": "2"}, "recovery and the next upgrade keep --env"


def test_a_boot_failure_rolls_back_and_leaves_the_old_generation_untouched():
    daemon, old = serving_daemon()
    responder, new = upgrade(daemon)
    post(daemon, new, ToDaemon.BOOT_FAILED, reason="ImportError: no module x", output="Traceback...")
    assert new.rolled_back and kinds(new)[-1] == ToMaster.DRAIN
    daemon.generations.exited(new, "exit 1")
    assert responder.error["code"] == codes.ROLLED_BACK
    assert "no module x" in responder.error["message"] and responder.error["output"] == "Traceback..."
    assert daemon.serving is old and kinds(old) == [] and new.state == GenerationState.FAILED
    assert daemon.metrics.generations.get("rolled_back") == 1
    assert daemon.metrics.operations.get("upgrade|rolled_back", [0])[0] == 1


def test_a_new_generation_that_exits_while_booting_is_rolled_back():
    daemon, old = serving_daemon()
    responder, new = upgrade(daemon)
    daemon.generations.exited(new, "killed by SIGSEGV")
    assert responder.error["code"] == codes.ROLLED_BACK and "SIGSEGV" in responder.error["reason"]
    assert daemon.serving is old


def test_boot_timeout_rolls_back_on_the_clock():
    daemon, old = serving_daemon({"boot_timeout": 30})
    responder, new = upgrade(daemon)
    tick(daemon, 29)
    assert not new.rolled_back
    tick(daemon, 2)
    assert new.rolled_back and "boot_timeout" in responder.events[-1][1]["reason"]
    daemon.generations.exited(new, "exit 0")
    assert responder.error["code"] == codes.ROLLED_BACK and daemon.serving is old


def test_max_surge_replaces_step_by_step_and_a_failure_regrows_the_old():
    daemon, old = serving_daemon({"workers": 4, "max_surge": 2})
    responder, new = upgrade(daemon)
    assert new.spawned_with["target"] == 2
    workers(daemon, new, 2)
    post(daemon, new, ToDaemon.READY)
    assert sent(old)[-1] == {"t": ToMaster.SCALE, "target": 2}, "the old one gives up a step"
    workers(daemon, old, 2)
    assert sent(new)[-1] == {"t": ToMaster.SCALE, "target": 4}, "the new one takes it"
    daemon.generations.exited(new, "exit 1")
    assert sent(old)[-1] == {"t": ToMaster.SCALE, "target": 4}, "rollback leaves the old one whole"
    assert responder.error["code"] == codes.ROLLED_BACK and daemon.serving is old


def test_max_surge_cuts_over_once_the_new_generation_has_the_whole_target():
    daemon, old = serving_daemon({"workers": 2, "max_surge": 1})
    responder, new = upgrade(daemon)
    workers(daemon, new, 1)
    post(daemon, new, ToDaemon.READY)
    workers(daemon, old, 1)
    workers(daemon, new, 2)
    assert daemon.serving is new and old.state == GenerationState.DRAINING


def test_a_death_after_cutover_fails_the_upgrade_and_recovery_starts_a_generation():
    daemon, old = serving_daemon()
    responder, new = upgrade(daemon)
    ready(daemon, new)
    daemon.generations.exited(new, "killed by SIGKILL")
    assert responder.error["code"] == codes.FAILED and "after cutover" in responder.error["message"]
    daemon.generations.exited(old, "exit 0")
    daemon.loop.run_once(0)  # recovery's timer (no backoff for a first crash)
    assert daemon.generations[-1].id == new.id + 1 and daemon.generations.starting


def test_a_second_changing_operation_is_refused_busy():
    daemon, old = serving_daemon()
    upgrade(daemon)
    other = Recorder()
    assert not daemon.begin(Scale(daemon, other, {"count": 3}))
    assert other.error["code"] == codes.BUSY and "upgrade is running" in other.error["message"]


def test_a_spawn_failure_is_a_rollback_with_nothing_started():
    daemon, old = serving_daemon()
    daemon.env.spawn_error = "python interpreter 'nope' not found"
    responder = Recorder()
    daemon.begin(Upgrade(daemon, responder, {}))
    assert responder.error["code"] == codes.ROLLED_BACK and "nope" in responder.error["reason"]
    assert daemon.serving is old and daemon.operation is None
