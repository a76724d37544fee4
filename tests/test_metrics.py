"""Metrics and health (metrics_bind): the daemon serves /metrics, /livez and
/readyz itself, so they answer while every worker is busy; request counters
stay continuous across upgrade, reload, max_requests recycling and daemon
re-exec; status shows busy workers and the listen backlog."""

from __future__ import annotations

import os
import pty
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from prometheus_client.parser import text_string_to_metric_families

from conftest import APPDCTL, http_get, wait_until
from test_drain import SLOW_APP, drain, in_background, start_slow_app


def metrics_address(appd) -> str:
    return wait_until(lambda: appd.status()["daemon"]["metrics_address"], 20, message="the metrics listener")


def scrape(appd) -> dict:
    """{(sample name, frozen labels): value}, parsed by prometheus_client's own parser."""
    status, headers, body = http_get(metrics_address(appd), "/metrics", timeout=5)
    assert status == 200 and headers["Content-Type"].startswith("text/plain"), (status, headers)
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, keys), value in samples.items() if sample == name and wanted <= keys)


def serve_and_count(appd, n: int, expected: int) -> None:
    for _ in range(n):
        assert appd.get("/", timeout=10)[0] == 200
    wait_until(lambda: total(scrape(appd), "appd_requests_total") == expected, 20,
               message=f"appd_requests_total to reach {expected}")


def test_counters_continuous_across_upgrade_reload_recycling_and_reexec(start_appd):
    appd = start_appd("-w", "2", "--max-requests", "4", "--metrics-bind", "127.0.0.1:0")
    serve_and_count(appd, 6, 6)  # 6 requests on 2 workers of 4: at least one was recycled
    assert appd.ctl("upgrade").returncode == 0
    serve_and_count(appd, 6, 12)
    assert appd.ctl("reload").returncode == 0
    serve_and_count(appd, 6, 18)
    before = scrape(appd)
    assert appd.ctl("upgrade", "--daemon").returncode == 0
    after = scrape(appd)
    for name, labels in (("appd_requests_total", {}), ("appd_operations_total", {"kind": "upgrade"}),
                         ("appd_generations_total", {}), ("appd_worker_exits_total", {})):
        assert total(after, name, **labels) >= total(before, name, **labels) > 0, name  # carried by re-exec
    serve_and_count(appd, 6, 24)
    samples = scrape(appd)
    assert total(samples, "appd_requests_total", method="GET", status="2xx") == 24
    assert total(samples, "appd_request_duration_seconds_count") == 24
    assert total(samples, "appd_response_bytes_total") > 0
    assert total(samples, "appd_worker_exits_total", cause="max_requests") >= 1
    assert total(samples, "appd_generations_total", event="started") >= 2
    assert total(samples, "appd_operations_total", kind="upgrade", outcome="done") >= 1
    # (max_requests may be replacing a worker right now: wait for the successor)
    wait_until(lambda: total(scrape(appd), "appd_workers", state="idle") == 2, 20, message="2 idle workers")
    listener = appd.address
    assert (("appd_listen_max_queued", frozenset({("listener", listener)})) in samples)


def test_health_and_status_while_every_worker_is_busy(start_appd, tmp_path):
    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    statsd.bind(("127.0.0.1", 0))
    statsd.settimeout(10)
    appd, marks = start_slow_app(start_appd, tmp_path, "-w", "1", "--metrics-bind", "127.0.0.1:0",
                                 "--statsd-host", f"127.0.0.1:{statsd.getsockname()[1]}",
                                 "--statsd-prefix", "shop")
    address = metrics_address(appd)
    held = in_background(http_get, appd.address, "/slow?s=4", timeout=20)
    wait_until(lambda: any(marks.iterdir()), 10, message="the slow request to reach the worker")
    host, _, port = appd.address.rpartition(":")
    waiting = socket.create_connection((host, int(port)))  # waits in the backlog: the only worker is busy
    try:
        assert http_get(address, "/livez", timeout=2)[0] == 200
        assert http_get(address, "/readyz", timeout=2)[0] == 200
        assert http_get(address, "/metrics", timeout=2)[0] == 200

        def busy_worker():
            status = appd.status()
            worker = status["generations"][-1]["workers"][0]
            return (worker if worker.get("busy") == 1 and worker["request_age_s"] > 0.2
                    and status["listeners"][0]["queued"] >= 1 else None)
        worker = wait_until(busy_worker, 10, message="status to show the busy worker and the queued connection")
        assert worker["request_age_s"] < 10
        assert total(scrape(appd), "appd_workers", state="busy") == 1
        result = appd.ctl("status")
        assert "BUSY" in result.stdout and " 1 (" in result.stdout and "queued 1/" in result.stdout, result.stdout
        # the StatsD sink sends the same figures, from the daemon too
        # (datagrams sent before the worker was busy may still wait in our buffer: read on)
        wait_until(lambda: "shop.workers.1.busy:1|g" in statsd.recv(65536).decode().splitlines(), 15,
                   message="a StatsD datagram with the busy worker")
    finally:
        waiting.close()
        statsd.close()
        held["thread"].join(20)


def test_readyz_503_before_a_generation_serves_and_while_draining(start_appd, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "slowboot.py").write_text("import time\ntime.sleep(3)  # import: no generation serves yet\n"
                                          + SLOW_APP)
    appd = start_appd("--chdir", str(tmp_path), "--metrics-bind", "127.0.0.1:0", "slowboot:app",
                      env={"SLOW_MARKS": str(marks)}, wait=False)
    address = metrics_address(appd)
    status, _, body = http_get(address, "/readyz", timeout=5)
    assert status == 503 and b"no generation is serving" in body, (status, body)
    appd.wait_ready()
    assert http_get(address, "/readyz", timeout=5)[0] == 200
    held = in_background(http_get, appd.address, "/slow?s=3", timeout=20)
    wait_until(lambda: any(marks.iterdir()), 10, message="the slow request to reach a worker")
    draining = drain(appd)  # the held request keeps the daemon (and /readyz) up meanwhile
    try:
        status, _, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(
            http_get(address, "/readyz", timeout=2)), 10, message="/readyz to answer 503 while draining")
        assert b"draining" in body  # a drain, not a quick stop
    finally:
        draining.communicate(timeout=30)
        held["thread"].join(20)


def test_metrics_listener_bounds_its_clients_and_top(start_appd):
    """Idle and oversized clients cannot starve the listener: at most 16 at once,
    the rest wait in the backlog, and a head over 8 KiB is refused."""
    appd = start_appd("-w", "1", "--metrics-bind", "127.0.0.1:0")
    host, _, port = metrics_address(appd).rpartition(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(20)]  # never send anything
    try:
        waiting = in_background(http_get, f"{host}:{port}", "/livez", timeout=20)
        assert appd.ctl("status").returncode == 0  # the daemon's loop goes on meanwhile
        daemon = psutil.Process(appd.pid)
        before = sum(daemon.cpu_times()[:2])
        time.sleep(1.5)  # a window to measure CPU over, not a wait for a condition
        assert sum(daemon.cpu_times()[:2]) - before < 0.75, "the daemon spins while its clients are full"
        for sock in idle[:8]:
            sock.close()  # free places: the waiting probe is taken
        waiting["thread"].join(20)
        assert waiting.get("result", (None,))[0] == 200, waiting
        with socket.create_connection((host, int(port)), timeout=10) as big:
            big.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)
            assert big.recv(100).startswith(b"HTTP/1.1 431"), "oversized head"
    finally:
        for sock in idle:
            sock.close()
    top_prints_count_views_then_exits(appd)


def top_prints_count_views_then_exits(appd):
    """appdctl top --count 2: two views, plain (not a terminal), a rate from the second on."""
    for _ in range(4):
        appd.get("/")
    result = appd.ctl("top", "--count", "2", "--interval", "0.5", timeout=30)
    assert result.returncode == 0, result.stderr
    views = result.stdout.strip().split("\n\n")  # not a terminal: plain blocks, no escapes
    assert len(views) == 2 and "\x1b" not in result.stdout, result.stdout
    workers = {w["pid"] for w in appd.status()["generations"][-1]["workers"]}
    for view in views:
        assert "REQ/S" in view and "backlog 0/" in view, view
        assert {int(line.split()[1]) for line in view.splitlines()[3:]} == workers, view
    assert "-" in views[0].splitlines()[3].split()[3]   # no rate before a second view
    float(views[1].splitlines()[3].split()[3])           # then a number

def worker_pids(appd) -> list[int]:
    return [w["pid"] for w in appd.serving_generation()["workers"]]


def serving_other_than(appd, gone: set, count: int):
    pids = set(worker_pids(appd))
    return pids if len(pids) == count and not pids & gone else None


def test_worker_exits_by_cause_in_metrics_and_status(start_appd, tmp_path):
    """retire, crash, timeout (heartbeat), scale and reload: each exit counted under its own
    cause, and status says why each replaced worker was replaced."""
    appd, marks = start_slow_app(start_appd, tmp_path, "-w", "2", "--timeout", "2",
                                 "--metrics-bind", "127.0.0.1:0")
    first, second = worker_pids(appd)
    assert appd.ctl("retire", str(first)).returncode == 0
    wait_until(lambda: serving_other_than(appd, {first}, 2), 20, message="the retired worker's successor")
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: serving_other_than(appd, {first, second}, 2), 20, message="a successor for the crash")
    in_background(http_get, appd.address, "/slow?s=30", timeout=40)  # the worker stops answering: timeout
    wait_until(lambda: total(scrape(appd), "appd_worker_exits_total", cause="timeout") == 1, 30,
               message="the hung worker killed for its timeout")
    assert appd.ctl("scale", "-1").returncode == 0
    assert appd.ctl("reload").returncode == 0
    wait_until(lambda: total(scrape(appd), "appd_worker_exits_total", cause="reload") == 1, 20,
               message="the reload's exit counted")
    samples = scrape(appd)
    causes = {dict(keys)["cause"]: value for (name, keys), value in samples.items()
              if name == "appd_worker_exits_total"}
    assert causes == {"retire": 1, "crash": 1, "timeout": 1, "scale": 1, "reload": 1}, causes
    reasons = {r["pid"]: r["reason"] for g in appd.status()["generations"] for r in g["replaced"]}
    assert reasons[first] == "retire" and reasons[second] == "crash", reasons
    assert sorted(reasons.values()) == ["crash", "retire", "timeout"], reasons


def probe_during(address: str, paths, stop: threading.Event, answers: list) -> None:
    while not stop.is_set():
        for path in paths:
            answers.append((path, http_get(address, path, timeout=5)[0]))
        stop.wait(0.05)


class TopOnTerminal:
    """appdctl top with a pseudo-terminal as its stdout, read in a thread."""

    def __init__(self, appd):
        leader, follower = pty.openpty()
        self.proc = subprocess.Popen([APPDCTL, "--socket", appd.socket, "top", "--interval", "0.2"],
                                     stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE)
        os.close(follower)
        self.leader, self.output = leader, bytearray()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        while True:
            try:
                data = os.read(self.leader, 65536)
            except OSError:  # EIO: top exited and the terminal is gone
                return
            if not data:
                return
            self.output += data

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(10)
        os.close(self.leader)
        return self.output.decode(errors="replace")


def test_metrics_and_readyz_answer_200_throughout_an_upgrade_and_top_shows_it(start_appd, tmp_path):
    """A generation serves the whole time: the new one imports for 2 s before it is ready.
    Meanwhile `appdctl top` on a terminal redraws in place with the upgrade's progress."""
    (tmp_path / "slowboot.py").write_text("import os, time\nif os.environ.get('SLOW_BOOT'):\n"
                                          "    time.sleep(2)\nif os.environ.get('BROKEN'):\n"
                                          "    raise RuntimeError('broken release')\n" + SLOW_APP)
    marks = tmp_path / "marks"
    marks.mkdir()
    appd = start_appd("--chdir", str(tmp_path), "-w", "1", "--metrics-bind", "127.0.0.1:0", "slowboot:app",
                      env={"SLOW_MARKS": str(marks)})
    stop, answers = threading.Event(), []
    prober = threading.Thread(target=probe_during, args=(metrics_address(appd), ("/readyz", "/metrics"),
                                                         stop, answers), daemon=True)
    prober.start()
    top = TopOnTerminal(appd)
    try:
        assert appd.ctl("upgrade", "--env", "SLOW_BOOT=1").returncode == 0
    finally:
        stop.set()
        prober.join(20)
        screen = top.stop()
    assert len(answers) >= 10, answers  # probed through the 2 s boot
    assert {status for _, status in answers} == {200}, answers
    views = screen.split("\x1b[H\x1b[2J")  # home + clear before each view: redrawn in place
    assert len(views) >= 3 and views[0] == "", screen[:500]
    assert any("operation: upgrade (gen 1 serving 1/1 ready, gen 2 starting 0/1 ready)" in view
               for view in views), screen
    # a broken release: counted as a rolled-back generation and operation
    assert appd.ctl("upgrade", "--env", "BROKEN=1").returncode == 1
    wait_until(lambda: total(scrape(appd), "appd_generations_total", event="rolled_back") == 1, 20,
               message="the rolled-back generation counted")
    samples = scrape(appd)
    assert total(samples, "appd_operations_total", kind="upgrade", outcome="rolled_back") == 1
    assert samples[("appd_last_operation_ok", frozenset({("kind", "upgrade"), ("outcome", "rolled_back")}))] == 0


def test_reload_moves_the_metrics_listener_to_a_new_metrics_bind(start_appd, tmp_path):
    config = tmp_path / "appd.toml"
    config.write_text('metrics_bind = "127.0.0.1:0"\nworkers = 1\n')
    appd = start_appd("--config", str(config))
    old = metrics_address(appd)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config.write_text(f'metrics_bind = "127.0.0.1:{port}"\nworkers = 1\n')
    assert appd.ctl("reload").returncode == 0
    assert appd.status()["daemon"]["metrics_address"] == f"127.0.0.1:{port}"
    assert http_get(f"127.0.0.1:{port}", "/livez", timeout=5)[0] == 200
    with pytest.raises(OSError):
        http_get(old, "/livez", timeout=2)
