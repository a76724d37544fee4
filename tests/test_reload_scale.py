"""reload, scale and retire: an invalid config changes nothing; a valid one
replaces the workers without ever having fewer ready than the target; new
listeners appear; the target survives reload and upgrade; one worker can be
replaced; and the signals map onto the same operations."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import APPD, APPS, Appd, assert_no_leftovers, http_get, wait_until
from helpers import worker_pids
from loadgen import Load

# Workers that take requests: ready ones and outgoing ones not yet told to stop.
SERVING_STATES = {"ready", "outgoing"}


def active_pids(generation: dict) -> set[int]:
    return {w["pid"] for w in generation["workers"] if w["state"] != "stopping"}


def serving_count(appd) -> int:
    """Ready workers of the serving generation when there are exactly `target` of them."""
    status = appd.status()
    serving = [g for g in status["generations"] if g["state"] == "serving"]
    if status["operation"] is None and len(serving) == 1 and len(status["generations"]) == 1:
        workers = serving[0]["workers"]
        if all(w["state"] == "ready" for w in workers):
            return len(workers)
    return -1


def idle(appd) -> dict | None:
    status = appd.status()
    return status if status["operation"] is None else None


class CapacityWatch:
    """Polls status in a thread and records, for the serving generation, the
    fewest ready workers it reported and the fewest workers taking requests."""

    def __init__(self, appd):
        self.appd = appd
        self.min_ready_workers = None
        self.min_serving = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        wait_until(lambda: self.samples > 0, 5, message="a first status sample")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)

    def _run(self):
        while not self._stop.is_set():
            status = self.appd.status()
            serving = [g for g in status["generations"] if g["state"] == "serving"]
            if serving:
                generation = serving[-1]
                taking = sum(1 for w in generation["workers"] if w["state"] in SERVING_STATES)
                self.min_serving = taking if self.min_serving is None else min(self.min_serving, taking)
                ready = generation["ready_workers"]
                self.min_ready_workers = ready if self.min_ready_workers is None else min(
                    self.min_ready_workers, ready)
            self.samples += 1
            self._stop.wait(0.02)


# --- reload ---

def test_invalid_config_changes_nothing(start_appd, tmp_path):
    config = tmp_path / "appd.toml"
    config.write_text("timeout = 20\n")
    appd = start_appd("-c", str(config), "-w", "2")
    before = appd.serving_generation()
    invalid = {
        "timeout = = 3\n": "not valid TOML",
        'timeout = "soon"\n': "timeout",
        "max_requests = -1\n": "max_requests",
        "timeuot = 3\n": "timeuot",
    }
    for text, named in invalid.items():
        config.write_text(text)
        code, reply = appd.ctl_json("reload")
        assert code == 1, (text, reply)
        assert reply["error"]["code"] == "failed"
        assert named in reply["error"]["message"] and "nothing changed" in reply["error"]["message"], reply
        status = appd.status()
        assert [g["id"] for g in status["generations"]] == [before["id"]]
        assert worker_pids(status["generations"][0]) == worker_pids(before)
        assert status["last_operation"]["op"] == "reload" and status["last_operation"]["outcome"] == "failed"
        assert appd.get("/")[0] == 200


def test_reload_replaces_workers_new_ones_ready_first(start_appd, tmp_path):
    config = tmp_path / "appd.toml"
    config.write_text("timeout = 20\n")
    appd = start_appd("-c", str(config), "-w", "2")
    before = appd.serving_generation()
    config.write_text("timeout = 25\n")
    with Load(appd.address, threads=8) as load, CapacityWatch(appd) as watch:
        code, reply = appd.ctl_json("reload")
        load.wait_for(50)
    assert code == 0, reply
    assert reply["changed"] == ["timeout"]
    print(f"reload under load: {load.report()}; fewest workers taking requests {watch.min_serving}, "
          f"fewest ready_workers reported {watch.min_ready_workers} ({watch.samples} samples)")
    assert not load.failures, load.report()
    assert watch.min_serving >= 2, "fewer workers than the target took requests during the reload"
    assert watch.min_ready_workers >= 2, "status reported fewer ready workers than the target"
    after = wait_until(lambda: serving_count(appd) == 2 and appd.serving_generation(), 10,
                       message="2 ready workers")
    assert after["id"] == before["id"], "a reload keeps the generation"
    assert not worker_pids(after) & worker_pids(before), "every worker was replaced"


class FileBoundAppd(Appd):
    """appd whose listeners come only from the config file (the harness
    otherwise adds `--bind 127.0.0.1:0`, and flags win over the file)."""

    def __init__(self, tmp_path: Path, config: Path):
        self.tmp = tmp_path
        self.socket = str(tmp_path / "ctl.sock")
        self.log_path = tmp_path / "appd.log"
        self.env = {**os.environ, "APPD_LOG_FORMAT": "console"}
        self.env.pop("APPD_SOCKET", None)
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen([APPD, "start", "--control-socket", self.socket, "-c", str(config)],
                                     cwd=APPS, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.seen: set[int] = set()


@pytest.fixture
def file_bound_appd(tmp_path):
    started = []

    def start(config: Path) -> Appd:
        directory = tmp_path / "filebound"
        directory.mkdir()
        appd = FileBoundAppd(directory, config)
        started.append(appd)
        appd.wait_ready()
        return appd

    yield start
    for appd in started:
        appd.stop()
        assert_no_leftovers(appd.seen | {appd.pid})


def test_reload_adds_listener_from_config(file_bound_appd, tmp_path):
    config = tmp_path / "appd.toml"
    config.write_text('bind = ["127.0.0.1:0"]\nworkers = 2\n')
    appd = file_bound_appd(config)
    first = appd.address
    extra = tmp_path / "extra.sock"
    config.write_text(f'bind = ["127.0.0.1:0", "unix:{extra}"]\nworkers = 2\n')
    with Load(first, threads=8) as load:
        code, reply = appd.ctl_json("reload")
        load.wait_for(50)
    assert code == 0, reply
    assert any("listeners changed" in note for note in reply["notes"]), reply
    listeners = appd.status()["listeners"]
    assert [l["address"] for l in listeners] == [first, f"unix:{extra}"]
    assert http_get(f"unix:{extra}", "/")[0] == 200
    assert http_get(first, "/")[0] == 200
    assert not load.failures, load.report()


def test_reload_whose_new_workers_fail_keeps_old_workers_and_old_config(start_appd, tmp_path):
    """The new config names an app that cannot import: the old workers keep serving,
    and the daemon forgets the failed config, so a crash recovery starts the old app."""
    config = tmp_path / "appd.toml"
    config.write_text('app = "core_probe:app"\nworkers = 2\n')
    appd = start_appd("-c", str(config))
    before = appd.serving_generation()
    config.write_text('app = "broken:app"\nworkers = 3\n')
    code, reply = appd.ctl_json("reload")
    assert code == 1 and reply["error"]["code"] == "failed", reply
    assert "broken deploy" in reply["error"]["message"] + reply["error"].get("output", ""), reply
    target = appd.status()["target_workers"]
    wait_until(lambda: appd.serving_generation()["ready_workers"] == target, 10,
               message="the target met by workers of the old app")
    assert worker_pids(before) <= worker_pids(appd.serving_generation()), "the old workers are kept"
    assert appd.get("/")[0] == 200
    # A crash recovery starts from the config that was serving, not the failed one.
    os.kill(before["master_pid"], signal.SIGKILL)
    def recovered():
        serving = [g for g in appd.status()["generations"] if g["state"] == "serving"]
        return serving and serving[-1]["id"] > before["id"] and serving[-1]["ready_workers"] == target
    wait_until(recovered, 20,
               message="a new generation of the old app after the master's crash")
    assert appd.get("/")[0] == 200
    assert appd.status()["daemon"]["state"] == "running"


def test_reload_says_which_changes_wait_for_the_next_upgrade(start_appd, tmp_path):
    """python and chdir belong to a generation's exec: reload records them, upgrade applies them."""
    config = tmp_path / "appd.toml"
    config.write_text("timeout = 20\n")
    appd = start_appd("-c", str(config), "-w", "1")
    before = appd.serving_generation()
    config.write_text(f"timeout = 20\nchdir = {str(tmp_path)!r}\n")
    code, reply = appd.ctl_json("reload")
    assert code == 0, reply
    assert reply["changed"] == ["chdir"]
    assert any(note == "chdir takes effect at the next upgrade" for note in reply["notes"]), reply
    assert appd.serving_generation()["id"] == before["id"], "a reload does not start a generation"


def test_reload_with_preload_app_says_upgrade_is_needed(start_appd):
    appd = start_appd("-w", "2", "--preload-app")
    code, reply = appd.ctl_json("reload")
    assert code == 0, reply
    assert any("upgrade" in note for note in reply["notes"]), reply
    human = appd.ctl("reload")
    assert human.returncode == 0 and "note:" in human.stdout and "upgrade" in human.stdout, human


# --- scale and retire ---

def test_scale_relative_and_absolute(start_appd):
    appd = start_appd("-w", "2")
    with Load(appd.address, threads=8) as load:
        for spec, expected in (("+1", 3), ("-1", 2), ("4", 4), ("-2", 2)):
            code, reply = appd.ctl_json("scale", spec)
            assert code == 0, (spec, reply)
            assert reply["target"] == expected
            status = appd.status()
            assert status["target_workers"] == expected
            serving = [g for g in status["generations"] if g["state"] == "serving"][0]
            assert serving["ready_workers"] == expected and len(active_pids(serving)) == expected, (spec, serving)
        load.wait_for(20)
    assert not load.failures, load.report()
    wait_until(lambda: serving_count(appd) == 2, 10, message="the scaled-down workers to exit")


def test_scale_out_of_range_is_refused(start_appd):
    appd = start_appd("-w", "2", "--max-workers", "4")
    for spec in ("0", "-2", "5", "+3"):
        result = appd.ctl("scale", spec)
        assert result.returncode == 2, (spec, result)
        assert "between 1 and max_workers (4)" in result.stderr, result.stderr
    status = appd.status()
    assert status["target_workers"] == 2
    assert len(active_pids(appd.serving_generation())) == 2


def test_scale_survives_reload_and_upgrade(start_appd):
    appd = start_appd("-w", "2")
    assert appd.ctl_json("scale", "3")[0] == 0
    code, reply = appd.ctl_json("reload")
    assert code == 0, reply
    generation = wait_until(lambda: serving_count(appd) == 3 and appd.serving_generation(), 10,
                            message="3 workers after the reload")
    assert appd.status()["target_workers"] == 3
    code, reply = appd.ctl_json("upgrade")
    assert code == 0, reply
    upgraded = wait_until(lambda: serving_count(appd) == 3 and appd.serving_generation(), 10,
                          message="3 workers after the upgrade")
    assert upgraded["id"] == generation["id"] + 1
    assert appd.status()["target_workers"] == 3


def test_retire_replaces_exactly_one_worker(start_appd):
    appd = start_appd("-w", "3")
    before = worker_pids(appd.serving_generation())
    victim = sorted(before)[1]
    with Load(appd.address, threads=8) as load:
        code, reply = appd.ctl_json("retire", str(victim))
        load.wait_for(50)
    assert code == 0, reply
    assert not load.failures, load.report()
    after = wait_until(lambda: serving_count(appd) == 3 and worker_pids(appd.serving_generation()), 10,
                       message="3 ready workers")
    assert victim not in after
    assert after & before == before - {victim}, "only the retired worker was replaced"
    assert len(after - before) == 1
    code, reply = appd.ctl_json("retire", str(victim))
    assert code == 1 and str(victim) in reply["error"]["message"], reply


# --- signals map onto the same operations ---

def test_signals_reload_upgrade_scale_and_drain(start_appd):
    appd = start_appd("-w", "2")
    first = appd.serving_generation()

    def finished(op: str, count: int):
        status = idle(appd)
        return (status and status["last_operation"] and status["last_operation"]["op"] == op
                and status["last_operation"]["ok"] and serving_count(appd) == count and status)

    appd.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: finished("reload", 2), 15, message="HUP to reload")
    reloaded = appd.serving_generation()
    assert reloaded["id"] == first["id"] and not worker_pids(reloaded) & worker_pids(first)

    appd.proc.send_signal(signal.SIGUSR2)
    wait_until(lambda: finished("upgrade", 2), 15, message="USR2 to upgrade")
    assert appd.serving_generation()["id"] == first["id"] + 1

    appd.proc.send_signal(signal.SIGTTIN)
    status = wait_until(lambda: finished("scale", 3), 15, message="TTIN to add a worker")
    assert status["target_workers"] == 3
    appd.proc.send_signal(signal.SIGTTOU)
    status = wait_until(lambda: finished("scale", 2), 15, message="TTOU to remove a worker")
    assert status["target_workers"] == 2

    appd.seen |= appd.descendants()
    appd.proc.send_signal(signal.SIGTERM)
    assert appd.proc.wait(15) == 0
    assert "drain" in appd.log()
