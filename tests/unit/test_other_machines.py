"""Reload (in place, and through a new generation when the listeners change),
scale, drain and stop, crash recovery: the daemon's state machines with fake
generations and a fake clock (fakes.py)."""

import signal

from appdctl import protocol as codes

from appd.daemon import DaemonState
from appd.generation import GenerationState
from appd.messages import ToDaemon, ToMaster
from appd.operations import Scale, Shutdown, Stop
from appd.recovery import CRASH_BACKOFF_MAX
from appd.reload import Reload

from .fakes import Recorder, kinds, post, ready, sent, serving_daemon, tick, workers


def reload(daemon):
    responder = Recorder()
    daemon.begin(Reload(daemon, responder))
    return responder


def config_file(tmp_path, text):
    path = tmp_path / "appd.toml"
    path.write_text(text)
    return {"config": str(path)}


def test_reload_replaces_workers_in_place_and_keeps_the_new_config(tmp_path):
    daemon, first = serving_daemon(config_file(tmp_path, "workers = 2\ntimeout = 30\n"))
    (tmp_path / "appd.toml").write_text("workers = 3\ntimeout = 45\n")
    responder = reload(daemon)
    assert kinds(first) == [ToMaster.SCALE, ToMaster.RELOAD] and sent(first)[0]["target"] == 3
    assert sent(first)[1]["settings"]["timeout"] == 45
    post(daemon, first, ToDaemon.RELOADED, ok=True)
    assert responder.result["outcome"] == "done" and "timeout" in responder.result["changed"]
    assert daemon.target == 3 and daemon.cfg.timeout == 45 and daemon.generations.all == [first]


def test_a_failed_reload_keeps_the_previous_config(tmp_path):
    daemon, first = serving_daemon(config_file(tmp_path, "timeout = 30\n"))
    (tmp_path / "appd.toml").write_text("timeout = 45\n")
    responder = reload(daemon)
    post(daemon, first, ToDaemon.RELOADED, ok=False, reason="worker failed to boot", output="tb")
    assert responder.error["code"] == codes.FAILED and daemon.cfg.timeout == 30


def test_an_invalid_config_file_changes_nothing(tmp_path):
    daemon, first = serving_daemon(config_file(tmp_path, "timeout = 30\n"))
    (tmp_path / "appd.toml").write_text("timeout = 'soon'\n")
    responder = reload(daemon)
    assert responder.error["code"] == codes.FAILED and "nothing changed" in responder.error["message"]
    assert kinds(first) == [] and daemon.cfg.timeout == 30


def test_new_listeners_go_through_a_new_generation_and_old_ones_close_after(tmp_path):
    daemon, first = serving_daemon(config_file(tmp_path, 'bind = ["127.0.0.1:0"]\n'))
    daemon.listeners.change(daemon.cfg)  # the fake daemon has bound nothing yet
    (old_listener,) = list(daemon.listeners)
    socket_path = tmp_path / "s.sock"
    (tmp_path / "appd.toml").write_text(f'bind = ["unix:{socket_path}"]\n')
    responder = reload(daemon)
    new = daemon.generations[-1]
    assert new.spawned_with["environment"]["APPD_FDS"] == str(list(daemon.listeners)[0].fd)
    assert old_listener.fd >= 0, "the old listener stays open until the new generation serves"
    ready(daemon, new)
    daemon.generations.exited(first, "exit 0")
    assert responder.result["outcome"] == "done" and "listeners changed: applied with a new generation" in \
        responder.result["notes"]
    assert daemon.last_operation["op"] == "reload" and daemon.listeners.specs_for(daemon.cfg) == [f"unix:{socket_path}"]
    assert old_listener.fd == -1, "no longer in bind: closed once unused"
    daemon.listeners.close_all()
    assert not socket_path.exists(), "a unix socket appd bound itself is unlinked when closed"


def test_new_listeners_are_closed_again_when_the_new_generation_fails(tmp_path):
    daemon, first = serving_daemon(config_file(tmp_path, "workers = 2\n"))
    socket_path = tmp_path / "s.sock"
    (tmp_path / "appd.toml").write_text('bind = ["unix:%s"]\n' % socket_path)
    responder = reload(daemon)
    assert socket_path.exists()
    new = daemon.generations[-1]
    post(daemon, new, ToDaemon.BOOT_FAILED, reason="boom")
    daemon.generations.exited(new, "exit 1")
    assert responder.error["code"] == codes.ROLLED_BACK and "reload rolled back" in responder.error["message"]
    assert not socket_path.exists() and len(daemon.listeners) == 0 and daemon.cfg.bind != [f"unix:{socket_path}"]
    assert daemon.serving is first


def test_scale_is_done_when_the_serving_generation_has_that_many_ready():
    daemon, first = serving_daemon()
    responder = Recorder()
    daemon.begin(Scale(daemon, responder, {"delta": 2}))
    assert sent(first)[-1] == {"t": ToMaster.SCALE, "target": 4} and daemon.target == 4
    workers(daemon, first, 3, count=4)
    assert responder.result is None
    workers(daemon, first, 4)
    assert responder.result["target"] == 4 and responder.result["previous"] == 2


def test_scale_times_out_on_the_clock_and_keeps_the_target():
    daemon, first = serving_daemon({"boot_timeout": 10, "graceful_timeout": 10})
    responder = Recorder()
    daemon.begin(Scale(daemon, responder, {"count": 5}))
    tick(daemon, 21)
    assert responder.error["code"] == codes.TIMEOUT and daemon.target == 5


def test_drain_sweeps_every_generation_then_the_daemon_exits_0():
    daemon, first = serving_daemon()
    responder = Recorder()
    daemon.begin(Shutdown(daemon, responder, {}))
    assert sent(first)[-1]["t"] == ToMaster.DRAIN and sent(first)[-1]["sweep"] is True
    assert daemon.state == DaemonState.STOPPING and daemon.exit_code is None
    daemon.generations.exited(first, "exit 0")
    assert responder.result["outcome"] == "drained" and daemon.exit_code == 0
    assert daemon.generations[-1].state == GenerationState.EXITED


def test_drain_delay_reports_not_ready_first_and_stop_takes_over():
    daemon, first = serving_daemon({"drain_delay": 5})
    drain = Recorder()
    daemon.begin(Shutdown(daemon, drain, {}))
    assert kinds(first) == [] and daemon.not_ready_reason().startswith("draining (drain_delay")
    stop = Recorder()
    assert daemon.begin(Stop(daemon, stop, {}))
    assert drain.error["code"] == codes.FAILED and "stop took over" in drain.error["message"]
    assert sent(first)[-1]["t"] == ToMaster.STOP
    daemon.generations.exited(first, "exit 0")
    assert stop.result["outcome"] == "stopped" and daemon.exit_code == 0


def test_a_serving_generation_that_dies_is_replaced_with_backoff_when_it_keeps_dying():
    daemon, first = serving_daemon()
    daemon.generations.exited(first, "killed by SIGKILL")
    assert daemon.recovery.backoff() == 0.0
    daemon.loop.run_once(0)
    second = daemon.generations[-1]
    assert second.id == 2 and second.state == GenerationState.STARTING
    ready(daemon, second)
    assert daemon.serving is second, "recovered"
    for crash in range(3):
        generation = daemon.serving or daemon.generations[-1]
        daemon.generations.exited(generation, "exit 1")
        daemon.recovery.recover()  # what its timer does, without waiting for the backoff
    assert daemon.state == DaemonState.CRASHLOOPING and len(daemon.recovery.crashes) == 4
    assert 0 < daemon.recovery.backoff() <= CRASH_BACKOFF_MAX
    ready(daemon, daemon.generations[-1])
    assert daemon.state == DaemonState.RUNNING


def test_a_long_lived_generation_starts_the_crash_count_afresh():
    daemon, first = serving_daemon()
    daemon.generations.exited(first, "exit 1")
    daemon.loop.run_once(0)
    second = daemon.generations[-1]
    ready(daemon, second)
    daemon.env.now += 60  # served a minute: not a crash loop
    daemon.generations.exited(second, "exit 1")
    assert len(daemon.recovery.crashes) == 1 and daemon.state == DaemonState.RUNNING


def test_nothing_is_recovered_while_stopping():
    daemon, first = serving_daemon()
    daemon.begin(Stop(daemon, Recorder(), {}))
    daemon.generations.exited(first, "exit 0")
    daemon.loop.run_once(0)
    assert len(daemon.generations) == 1 and (first.id, signal.SIGKILL) not in daemon.env.killed


def test_a_new_metrics_bind_is_applied_by_reload_and_the_old_one_closed(tmp_path):
    daemon, first = serving_daemon(config_file(tmp_path, 'metrics_bind = "127.0.0.1:0"\n'))
    daemon.start_side_servers()
    old = daemon.health
    old_address = old.address
    elsewhere = "[::1]:0" if _has_ipv6() else "127.0.0.2:0"
    (tmp_path / "appd.toml").write_text(f'metrics_bind = "{elsewhere}"\n')
    responder = reload(daemon)
    assert daemon.health is old, "the old one serves until the reload's end"
    post(daemon, first, ToDaemon.RELOADED, ok=True)
    assert responder.result["outcome"] == "done" and "metrics_bind" in responder.result["changed"]
    assert daemon.health is not old and daemon.health.address != old_address and old.sock.fileno() == -1
    daemon.health.shutdown()


def test_a_metrics_bind_that_cannot_be_bound_changes_nothing(tmp_path):
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    daemon, first = serving_daemon(config_file(tmp_path, "timeout = 30\n"))
    (tmp_path / "appd.toml").write_text(f'timeout = 40\nmetrics_bind = "127.0.0.1:{taken.getsockname()[1]}"\n')
    try:
        responder = reload(daemon)
    finally:
        taken.close()
    assert responder.error["code"] == codes.FAILED and "metrics_bind" in responder.error["message"]
    assert daemon.health is None and daemon.cfg.timeout == 30 and kinds(first) == []


def _has_ipv6() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False
