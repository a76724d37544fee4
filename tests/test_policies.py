"""Production policies: drain_delay (not ready first, still serving, then drain)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

from conftest import APPDCTL, wait_until
from loadgen import Load
from test_metrics import scrape, total
from test_upgrade import start_myapp, write_app


def status_json(appd) -> dict:
    code, status = appd.ctl_json("status")
    assert code == 0, status
    return status


def in_delay(appd) -> dict | None:
    daemon = status_json(appd)["daemon"]
    return daemon if daemon.get("drain_delay_left_s") is not None else None


def test_drain_delay_reports_not_ready_keeps_serving_then_drains(start_appd):
    appd = start_appd("-w", "1", "--drain-delay", "2")
    appd.seen |= appd.descendants()
    appd.proc.send_signal(signal.SIGTERM)
    daemon = wait_until(lambda: in_delay(appd), 10, message="status to show the drain delay")
    assert daemon["state"] == "draining"
    assert daemon["not_ready"].startswith("draining (drain_delay"), daemon
    human = appd.ctl("status").stdout
    assert "draining, delay (" in human, human
    # Still accepting and serving new connections during the delay.
    status, _, _ = appd.get("/")
    assert status == 200
    assert appd.proc.wait(20) == 0
    assert "drain_delay_cut_short" not in appd.log()


def test_second_sigterm_cuts_drain_delay_short(start_appd):
    appd = start_appd("-w", "1", "--drain-delay", "120")
    appd.seen |= appd.descendants()
    appd.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: in_delay(appd), 10, message="status to show the drain delay")
    appd.proc.send_signal(signal.SIGTERM)
    assert appd.proc.wait(20) == 0  # far less than the 120 s delay
    assert "drain_delay_cut_short" in appd.log()


def test_appdctl_drain_streams_delay_and_stop_cuts_it_short(start_appd):
    appd = start_appd("-w", "1", "--drain-delay", "120")
    appd.seen |= appd.descendants()
    draining = subprocess.Popen([APPDCTL, "--socket", appd.socket, "--json", "drain"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: in_delay(appd), 10, message="status to show the drain delay")
    stopped = appd.ctl("stop")
    assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
    stdout, stderr = draining.communicate(timeout=30)
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"id"')]
    assert any(e["event"] == "draining" and e.get("phase") == "delay" for e in events), stdout
    assert draining.returncode != 0, "the drain was interrupted by stop"
    assert appd.proc.wait(20) == 0


# --- max_surge: upgrade step by step ---

def watch_workers(appd, stop: threading.Event, peaks: dict) -> None:
    """Sample status: the most worker processes and the fewest ready workers seen."""
    while not stop.is_set():
        try:
            gens = appd.status()["generations"]
        except OSError:
            continue
        peaks["processes"] = max(peaks.get("processes", 0), sum(len(g["workers"]) for g in gens))
        stop.wait(0.05)


def test_upgrade_with_max_surge_steps_one_worker_at_a_time(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "3", "--max-surge", "1")
    before = appd.serving_generation()
    write_app(tmp_path, '"v2"')
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=watch_workers, args=(appd, stop, peaks), daemon=True)
    watcher.start()
    with Load(appd.address, threads=4) as load:
        result = appd.ctl("--json", "upgrade")
        load.wait_for(20)
    stop.set()
    watcher.join(10)
    assert result.returncode == 0, (result.stdout, result.stderr)
    surges = [json.loads(line) for line in result.stdout.splitlines()
              if line.startswith('{"id"') and json.loads(line)["event"] == "surge"]
    assert [(e["new_workers"], e["old_workers"]) for e in surges] == [(1, 2), (2, 1)], result.stdout
    assert not load.failures, load.report()
    assert peaks["processes"] <= 4, peaks  # target 3 + max_surge 1
    assert appd.get("/")[2] == b"v2\n"
    status = appd.status()
    assert [(g["id"], len(g["workers"])) for g in status["generations"]] == [(before["id"] + 1, 3)]


def test_max_surge_rollback_midway_gives_the_old_generation_back_its_workers(start_appd, tmp_path):
    """The new generation (BREAK=1) boots one worker, then every later one fails:
    the upgrade rolls back after its first step and the old generation, which gave
    up a worker for that step, gets back to the full target."""
    count = tmp_path / "booted"
    write_app(tmp_path, '"v1"', prelude=f"""
        if os.environ.get("BREAK"):
            with open({str(count)!r}, "a+") as f:
                f.seek(0)
                booted = len(f.read())
                f.write("x")
            if booted >= 1:
                raise SystemExit("only one worker of the new generation boots")
        """)
    appd = start_myapp(start_appd, tmp_path, "-w", "3", "--max-surge", "1", "--boot-timeout", "4")
    before = appd.serving_generation()
    result = appd.ctl("--json", "upgrade", "--env", "BREAK=1")
    assert result.returncode == 1 and '"rolled_back"' in result.stdout, (result.stdout, result.stderr)
    assert '"surge"' in result.stdout, "the rollback should come after the first step"
    serving = wait_until(lambda: (lambda g: g if g["ready_workers"] == 3 else None)(appd.serving_generation()),
                         20, message="the old generation whole again")
    assert serving["id"] == before["id"]
    assert appd.get("/")[2] == b"v1\n"


# --- recycling by age and memory ---

def replaced(appd) -> list[dict]:
    return [r for g in appd.status()["generations"] for r in g["replaced"]]


def test_max_worker_lifetime_replaces_workers_successor_first(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2", "--max-worker-lifetime", "2",
                       "--metrics-bind", "127.0.0.1:0")
    first = {w["pid"] for w in appd.serving_generation()["workers"]}
    with Load(appd.address, threads=4) as load:
        done = wait_until(lambda: len(replaced(appd)) >= 2 and replaced(appd), 30,
                          message="two workers replaced for their age")
        load.wait_for(20)
    assert not load.failures, load.report()
    assert {r["pid"] for r in done[:2]} == first, done
    assert all(r["reason"].startswith("max_worker_lifetime") for r in done), done
    wait_until(lambda: total(scrape(appd), "appd_worker_exits_total", cause="lifetime") >= 2, 20,
               message="the worker exits counted under cause lifetime")
    assert appd.wait_ready()["target_workers"] == 2


def test_max_worker_memory_replaces_a_worker_over_the_limit(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "1", "--max-worker-memory", "1K",
                       "--metrics-bind", "127.0.0.1:0")
    done = wait_until(lambda: replaced(appd), 20, message="a worker replaced for its memory")
    assert done[0]["reason"].startswith("max_worker_memory (rss "), done
    wait_until(lambda: total(scrape(appd), "appd_worker_exits_total", cause="memory") >= 1, 20,
               message="the worker exit counted under cause memory")
    assert appd.get("/")[2] == b"v1\n"  # a successor serves
    human = appd.ctl("status").stdout
    assert f"worker {done[0]['pid']}: max_worker_memory" in human, human


def test_reload_with_max_surge_replaces_workers_one_at_a_time(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "3", "--max-surge", "1")
    before = {w["pid"] for w in appd.serving_generation()["workers"]}
    write_app(tmp_path, '"v2"')
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=watch_workers, args=(appd, stop, peaks), daemon=True)
    watcher.start()
    with Load(appd.address, threads=4) as load:
        result = appd.ctl("reload")
        load.wait_for(20)
    stop.set()
    watcher.join(10)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert not load.failures, load.report()
    assert peaks["processes"] <= 4, peaks  # target 3 + max_surge 1
    after = appd.wait_ready()
    workers = {w["pid"] for g in after["generations"] for w in g["workers"]}
    assert len(workers) == 3 and not workers & before
    assert appd.get("/")[2] == b"v2\n"
