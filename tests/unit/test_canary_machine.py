"""Probation and canary upgrades (canary.py's WatchedRollout): rollback on the
error rate with the old generation resumed first, a crash loop during
probation, a probation that passes, promote by hand, a held canary carried
across a daemon re-exec's exported/adopted state. Fake generations, fake
clock: see fakes.py."""

import msgpack

from appdctl import protocol as codes

from appd.canary import decide_by_hand, upgrade_operation
from appd.generation import GenerationState as State
from appd.messages import KIND, ToDaemon, ToMaster

from .fakes import FakeChannel, Recorder, kinds, make_daemon, post, ready, sent, serving_daemon, tick, workers


def upgrade(daemon, **args):
    responder = Recorder()
    assert daemon.begin(upgrade_operation(daemon, responder, args))
    return responder, daemon.generations[-1]


def report(daemon, generation, ok: int = 0, errors: int = 0, path: str = "/pay", exits=()):
    """One metrics report of `generation`'s master: `ok` 2xx, `errors` 500s of `path`, worker exits."""
    requests = {"http|GET|2xx": [ok], "http|GET|5xx": [errors]}
    if errors:
        requests[f"!fail|500|{path}"] = [errors]
    post(daemon, generation, ToDaemon.METRICS, requests=requests, exits=list(exits))


def on_probation(flags=None):
    daemon, old = serving_daemon({"probation": 10, **(flags or {})})
    responder, new = upgrade(daemon)
    assert new.spawned_with["settings"]["report_outcomes"] is True
    ready(daemon, new)
    return daemon, old, new, responder


def test_probation_pauses_the_old_generation_and_resumes_it_at_once_over_the_error_rate():
    daemon, old, new, responder = on_probation()
    assert daemon.serving is new and old.state == State.STANDBY
    assert sent(old)[-1] == {KIND: ToMaster.PAUSE, "handoff": False}, "stops accepting, its workers stay"
    assert ToMaster.SCALE not in kinds(old), "no worker is stopped"
    report(daemon, new, ok=15, errors=5)
    tick(daemon, 1)
    assert kinds(old)[-2:] == [ToMaster.RESUME, ToMaster.SCALE] and sent(old)[-1]["target"] == 2
    # The paused workers accept again at once: no boot to wait for, and only then does the new one drain.
    assert daemon.serving is old and new.state == State.DRAINING and sent(new)[-1][KIND] == ToMaster.DRAIN
    daemon.generations.exited(new, "exit 0")
    error = responder.error
    assert error["code"] == codes.ROLLED_BACK and "5xx ratio 0.250" in error["reason"]
    assert error["evidence"]["failing_paths"] == [["/pay", 5]] and error["evidence"]["requests"] == 20
    assert daemon.metrics.operations.get("upgrade|rolled_back", [0])[0] == 1


def test_gthread_workers_hand_their_idle_connections_on_as_they_pause():
    daemon, old, new, responder = on_probation({"worker_class": "gthread"})
    assert sent(old)[-1] == {KIND: ToMaster.PAUSE, "handoff": True}


def test_command_workers_cannot_pause_and_stand_by_at_0_workers_resuming_once_forked_again():
    daemon, old, new, responder = on_probation({"worker_class": "command", "command": ["server"]})
    assert sent(old)[-1] == {KIND: ToMaster.SCALE, "target": 0}, "stops accepting, its master stays"
    workers(daemon, old, 0)
    report(daemon, new, ok=15, errors=5)
    tick(daemon, 1)
    assert sent(old)[-1] == {KIND: ToMaster.SCALE, "target": 2}, "resumes"
    assert new.state == State.SERVING, "the new one drains only once the old one accepts again"
    workers(daemon, old, 2)
    assert daemon.serving is old and new.state == State.DRAINING and sent(new)[-1][KIND] == ToMaster.DRAIN
    daemon.generations.exited(new, "exit 0")
    assert responder.error["code"] == codes.ROLLED_BACK


def test_too_few_requests_cannot_roll_back_and_a_passed_probation_drains_the_old():
    daemon, old, new, responder = on_probation({"rollback_min_requests": 50})
    report(daemon, new, ok=5, errors=5)
    tick(daemon, 9)
    assert old.state == State.STANDBY and [n for n, _ in responder.events].count("probation") >= 2
    tick(daemon, 2)
    assert old.state == State.DRAINING and sent(old)[-1][KIND] == ToMaster.DRAIN
    daemon.generations.exited(old, "exit 0")
    result = responder.result
    assert result["outcome"] == "done" and result["observed"]["errors"] == 5
    assert "inconclusive" in result["notes"][0]


def test_worker_crashes_during_probation_roll_back():
    daemon, old, new, responder = on_probation()
    report(daemon, new, ok=3, exits=["crash"])
    tick(daemon, 1)
    assert old.state == State.STANDBY, "one crash is not a crash loop"
    report(daemon, new, exits=["timeout"])
    tick(daemon, 1)
    assert kinds(old)[-2:] == [ToMaster.RESUME, ToMaster.SCALE] and daemon.serving is old
    daemon.generations.exited(new, "exit 0")
    assert responder.error["code"] == codes.ROLLED_BACK
    assert "1 worker crash(es) and 1 timeout" in responder.error["reason"]


def test_a_new_master_that_dies_during_probation_resumes_the_old_one():
    daemon, old, new, responder = on_probation()
    daemon.generations.exited(new, "killed by SIGSEGV")
    assert kinds(old)[-2:] == [ToMaster.RESUME, ToMaster.SCALE] and daemon.serving is old
    assert responder.error["code"] == codes.ROLLED_BACK and "SIGSEGV" in responder.error["reason"]


def test_a_canary_over_the_error_rate_is_stopped_and_the_old_generation_never_stopped():
    daemon, old = serving_daemon({"probation": 10, "workers": 4})
    responder, new = upgrade(daemon, canary=1)
    assert new.spawned_with["target"] == 1
    canary_ready(daemon, new)
    assert new.state == State.CANARY and daemon.serving is old
    report(daemon, new, ok=10, errors=10)
    tick(daemon, 1)
    assert new.state == State.DRAINING and new.rolled_back and sent(old) == []
    daemon.generations.exited(new, "exit 0")
    assert responder.error["code"] == codes.ROLLED_BACK and new.state == State.FAILED


def canary_ready(daemon, generation) -> None:
    """Its master's table: one ready worker, its own target 1."""
    table = [{"pid": 1000 * generation.id, "state": "ready", "started_at": 0.0, "requests": 0}]
    post(daemon, generation, ToDaemon.WORKERS, phase="serving", target=1, ready=1, workers=table)
    post(daemon, generation, ToDaemon.READY)


def held_canary():
    daemon, old = serving_daemon({"workers": 3})
    responder, new = upgrade(daemon, canary=1, hold=True)
    canary_ready(daemon, new)
    assert responder.result["outcome"] == "held" and daemon.operation is None
    assert new.state == State.CANARY and daemon.serving is old
    return daemon, old, new


def test_a_held_canary_refuses_another_upgrade_and_is_promoted_by_hand():
    daemon, old, new = held_canary()
    other = Recorder()
    daemon.begin(upgrade_operation(daemon, other, {}))
    assert other.error["code"] == codes.BUSY and "held" in other.error["message"]
    promote = Recorder()
    decide_by_hand(daemon, "promote", promote)
    assert sent(new)[-1] == {KIND: ToMaster.SCALE, "target": 3}, "grows to the target"
    workers(daemon, new, 3)
    assert daemon.serving is new and old.state == State.DRAINING
    daemon.generations.exited(old, "exit 0")
    assert promote.result["outcome"] == "done" and promote.result["generation"] == new.id


def test_nothing_to_decide_without_a_held_canary_or_a_probation():
    daemon, old = serving_daemon()
    responder = Recorder()
    decide_by_hand(daemon, "rollback", responder)
    assert responder.error["code"] == codes.FAILED and "nothing to rollback" in responder.error["message"]


def test_a_held_canary_survives_exported_and_adopted_state_and_is_rolled_back_there():
    daemon, old, new = held_canary()
    report(daemon, new, ok=4, errors=2, path="/login")
    entries = msgpack.unpackb(msgpack.packb(daemon.generations.export_state(daemon.clock())), raw=False)
    after = make_daemon({"workers": 3})  # the re-exec'd daemon
    after.generations.adopt(entries, daemon.generations.next_id)
    for generation in after.generations:
        generation.channel = FakeChannel()  # adopted with its channel fd: here, a fake one
    canary = after.generations[-1]
    assert canary.state == State.CANARY and after.serving.id == old.id
    rollback = Recorder()
    decide_by_hand(after, "rollback", rollback)
    assert canary.state == State.DRAINING and canary.rolled_back and sent(after.serving) == []
    after.generations.exited(canary, "exit 0")
    assert rollback.result["outcome"] == "rolled_back"
    assert rollback.result["evidence"]["failing_paths"] == [["/login", 2]], "outcomes came across"


def test_a_held_probation_survives_exported_and_adopted_state_and_is_rolled_back_there():
    daemon, old = serving_daemon({"probation": 5})
    responder, new = upgrade(daemon, hold=True)
    ready(daemon, new)
    assert old.state == State.STANDBY and kinds(old)[-1] == ToMaster.PAUSE
    tick(daemon, 6)
    assert responder.result["outcome"] == "held" and daemon.operation is None
    other = Recorder()
    daemon.begin(upgrade_operation(daemon, other, {}))
    assert other.error["code"] == codes.BUSY and "held (standby)" in other.error["message"]
    entries = msgpack.unpackb(msgpack.packb(daemon.generations.export_state(daemon.clock())), raw=False)
    after = make_daemon({"workers": 2, "probation": 5})  # the re-exec'd daemon
    after.generations.adopt(entries, daemon.generations.next_id)
    for generation in after.generations:
        generation.channel = FakeChannel()
    standby, serving = after.generations[0], after.generations[-1]
    assert standby.state == State.STANDBY and after.serving is serving
    rollback = Recorder()
    decide_by_hand(after, "rollback", rollback)
    assert kinds(standby) == [ToMaster.RESUME, ToMaster.SCALE] and after.serving is standby
    assert serving.state == State.DRAINING and kinds(serving) == [ToMaster.DRAIN]
    after.generations.exited(serving, "exit 0")
    assert rollback.result["outcome"] == "rolled_back"


def test_a_held_probation_is_promoted_by_hand():
    daemon, old = serving_daemon({"probation": 5})
    responder, new = upgrade(daemon, hold=True)
    ready(daemon, new)
    tick(daemon, 6)
    promote = Recorder()
    decide_by_hand(daemon, "promote", promote)
    assert old.state == State.DRAINING and kinds(old)[-1] == ToMaster.DRAIN and daemon.serving is new
    daemon.generations.exited(old, "exit 0")
    assert promote.result["outcome"] == "done" and promote.result["generation"] == new.id
