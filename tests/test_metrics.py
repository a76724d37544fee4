"""Metrics and health (metrics_bind): the daemon serves /metrics, /livez and
/readyz itself, so they answer while every worker is busy; request counters
stay continuous across upgrade, reload, max_requests recycling and daemon
re-exec; status shows busy workers and the listen backlog."""

from __future__ import annotations

import socket
import time

import psutil

from prometheus_client.parser import text_string_to_metric_families

from conftest import http_get, wait_until
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
    assert appd.ctl("upgrade", "--daemon").returncode == 0
    serve_and_count(appd, 6, 24)
    samples = scrape(appd)
    assert total(samples, "appd_requests_total", method="GET", status="2xx") == 24
    assert total(samples, "appd_request_duration_seconds_count") == 24
    assert total(samples, "appd_response_bytes_total") > 0
    assert total(samples, "appd_worker_exits_total", cause="max_requests") >= 1
    assert total(samples, "appd_generations_total", event="started") >= 2
    assert total(samples, "appd_operations_total", kind="upgrade", outcome="done") >= 1
    assert total(samples, "appd_workers", state="idle") == 2
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
        lines = wait_until(lambda: [line for line in statsd.recv(65536).decode().splitlines()
                                    if line.startswith("shop.workers.1.busy:")], 15, message="a StatsD datagram")
        assert lines == ["shop.workers.1.busy:1|g"], lines
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