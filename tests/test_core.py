"""appd core on real processes: listeners, worker supervision (kill, hang,
recycling), graceful stop, crash recovery of masters and of the daemon, real
apps, logging, process titles and the pidfile."""

from __future__ import annotations

import json
import os
import signal
import stat
import socket
import time
from collections import Counter

import psutil
import pytest

from conftest import Background, http_get, running_appd, wait_until
from helpers import reaping_orphans, worker_pids


# --- helpers ---

def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def log_events(appd, event: str) -> list[dict]:
    """JSON log lines of `appd` (started with --log-format json) for one event."""
    found = []
    for line in appd.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a traceback or a stack dump printed by a worker
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


def raw_exchange(address: str, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh TCP connection and read until the server closes it."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")


# --- listeners ---

def test_serves_on_ipv4_loopback(start_appd):
    appd = start_appd("-b", "127.0.0.1:0")
    [listener] = appd.status()["listeners"]
    assert listener["address"].startswith("127.0.0.1:") and not listener["address"].endswith(":0")
    status, _, body = http_get(listener["address"], "/")
    assert status == 200 and body.startswith(b"Hello from appd (generation 1)")


@needs_ipv6
def test_serves_on_ipv6_loopback(start_appd):
    appd = start_appd("-b", "[::1]:0")
    [listener] = appd.status()["listeners"]
    assert listener["address"].startswith("[::1]:")
    status, _, body = http_get(listener["address"], "/")
    assert status == 200 and b"generation 1" in body


def test_serves_on_unix_socket_and_removes_it_at_exit(start_appd, tmp_path):
    path = tmp_path / "app.sock"
    appd = start_appd("--bind", f"unix:{path}")
    [listener] = appd.status()["listeners"]
    assert listener["address"] == f"unix:{path}"
    status, _, body = http_get(f"unix:{path}", "/")
    assert status == 200 and b"generation 1" in body
    appd.stop()
    assert appd.proc.returncode == 0
    assert not path.exists(), "the daemon left its unix socket behind"


def test_unix_listener_gets_the_configured_mode(start_appd, tmp_path):
    path = tmp_path / "app.sock"
    appd = start_appd("--bind", f"unix:{path}", "--unix-socket-mode", "0660")
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert http_get(f"unix:{path}", "/")[0] == 200
    appd.stop()
    assert not path.exists()


def test_several_listeners_serve_at_once(start_appd, tmp_path):
    binds = ["-b", "127.0.0.1:0", "-b", f"unix:{tmp_path / 'several.sock'}"]
    if has_ipv6_loopback():
        binds += ["-b", "[::1]:0"]
    appd = start_appd(*binds, "-w", "2")
    addresses = [l["address"] for l in appd.status()["listeners"]]
    assert len(addresses) == len(binds) // 2
    assert len({l["fd"] for l in appd.status()["listeners"]}) == len(addresses)
    for _ in range(3):  # every listener, several times, each answered by some worker
        for address in addresses:
            status, _, body = http_get(address, "/")
            assert status == 200 and b"generation 1" in body, address


# --- worker supervision ---

def test_sigkilled_worker_is_replaced(start_appd):
    appd = start_appd("-w", "2")
    generation = appd.serving_generation()
    victim = generation["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        current = appd.serving_generation()
        pids = {w["pid"] for w in current["workers"]}
        return current if victim not in pids and len(pids) == 2 and current["ready_workers"] == 2 else None

    after = wait_until(replaced, 10, message="a replacement worker")
    assert after["id"] == generation["id"], "a worker crash must not start a new generation"
    assert after["master_pid"] == generation["master_pid"]
    assert not alive(victim)
    for _ in range(4):
        assert appd.get("/")[0] == 200


def test_hung_worker_is_killed_after_timeout_and_replaced(start_appd):
    appd = start_appd("hang:app", "-w", "2", "--timeout", "2", "--log-format", "json")
    generation = appd.serving_generation()
    before = {w["pid"] for w in generation["workers"]}
    address = appd.address
    hung = Background(address, "/hang", timeout=30)

    # Until the master gives up on the hung worker, the other one keeps answering.
    answered = 0
    deadline = time.monotonic() + 15
    while not log_events(appd, "worker_timeout") and time.monotonic() < deadline:
        assert http_get(address, "/", timeout=5)[0] == 200
        answered += 1
    timeouts = [r for r in log_events(appd, "worker_timeout") if "worker" in r]
    assert timeouts, f"no worker_timeout logged by the master:\n{appd.log()[-3000:]}"
    assert answered > 0
    record = timeouts[0]
    victim = record["worker"]
    assert victim in before
    assert record["timeout"] == 2.0
    assert record["pid"] == generation["master_pid"] and record["generation"] == generation["id"]

    # The hung request's connection is closed without an answer; the worker is gone.
    assert isinstance(hung.join(), Exception)
    wait_until(lambda: not alive(victim), 5, message="the hung worker to die")

    def replaced():
        current = appd.serving_generation()
        pids = {w["pid"] for w in current["workers"]}
        return current if victim not in pids and current["ready_workers"] == 2 else None

    after = wait_until(replaced, 10, message="a replacement for the hung worker")
    assert after["id"] == generation["id"]
    killed = [r["worker"] for r in log_events(appd, "worker_timeout") if "worker" in r]
    assert killed == [victim], "only the hung worker may be killed for silence"
    assert appd.get("/")[0] == 200


def requests_per_worker(address: str, count: int) -> Counter:
    """Send `count` requests to core_probe (each answers "pid N"); none may fail."""
    served = Counter()
    for _ in range(count):
        status, _, body = http_get(address, "/")
        assert status == 200, body
        served[int(body.split()[1])] += 1
    return served


def test_max_requests_recycles_workers_without_failing_a_request(start_appd):
    appd = start_appd("core_probe:app", "-w", "2", "--max-requests", "5")
    served = requests_per_worker(appd.address, 30)
    assert len(served) >= 6, f"30 requests at 5 per worker need at least 6 workers, saw {served}"
    assert max(served.values()) <= 5, served

    def counted():
        workers = {w["pid"]: w["requests"] for w in appd.serving_generation()["workers"]}
        settled = len(workers) == 2 and all(served[pid] < 5 for pid in workers)
        return workers if settled and all(n == served[pid] for pid, n in workers.items()) else None

    live = wait_until(counted, 10, message="status to count each live worker's requests")
    retired = [pid for pid in served if pid not in live]
    assert retired and all(served[pid] == 5 for pid in retired), served
    assert all(not alive(pid) for pid in retired)
    assert appd.serving_generation()["id"] == 1


def test_max_requests_jitter_spreads_worker_lifetimes(start_appd):
    appd = start_appd("core_probe:app", "-w", "2", "--max-requests", "2", "--max-requests-jitter", "4")
    served = requests_per_worker(appd.address, 60)
    live = worker_pids(appd)
    retired = [pid for pid in served if pid not in live and not alive(pid)]
    counts = [served[pid] for pid in retired]
    assert len(retired) >= 6, served
    assert all(2 <= n <= 6 for n in counts), f"each limit is max_requests + 0..jitter: {counts}"
    assert len(set(counts)) > 1, f"with jitter the workers must not all stop at the same count: {counts}"


# --- stopping and crash recovery ---

def test_term_lets_an_in_flight_request_finish_then_exits_0(start_appd, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    appd = start_appd("core_probe:app", "-w", "2", env={"CORE_MARK_DIR": str(marks)})
    slow = Background(appd.address, "/slow?s=2")
    wait_until(lambda: list(marks.iterdir()), 10, message="the slow request to reach the app")
    started = time.monotonic()
    appd.proc.send_signal(signal.SIGTERM)
    status, _, body = slow.join()
    assert status == 200 and body.startswith(b"slept 2"), body
    assert appd.proc.wait(20) == 0
    assert time.monotonic() - started < 10
    assert "drain" in appd.log()


def test_sigkilled_master_is_replaced_by_a_new_generation(start_appd):
    appd = start_appd("-w", "2")
    old = appd.serving_generation()
    old_pids = [old["master_pid"]] + [w["pid"] for w in old["workers"]]
    os.kill(old["master_pid"], signal.SIGKILL)

    def new_generation_serving():
        generation = appd.serving_generation()
        return generation if generation["id"] > old["id"] and generation["ready_workers"] == 2 else None

    new = wait_until(new_generation_serving, 15, message="a new generation to serve")
    assert new["id"] == old["id"] + 1
    status, _, body = appd.get("/")
    assert status == 200 and f"generation {new['id']}".encode() in body
    wait_until(lambda: not any(alive(pid) for pid in old_pids), 10,
               message="every process of the killed generation to exit")
    for pid in old_pids:
        with pytest.raises(psutil.NoSuchProcess):  # reaped, not left as a zombie
            psutil.Process(pid)
    assert appd.proc.poll() is None, "the daemon must survive its master"
    assert f"appd: master gen {new['id']}" in " ".join(psutil.Process(new["master_pid"]).cmdline())


def test_sigkilled_daemon_takes_its_masters_and_workers_down(start_appd):
    appd = start_appd("-w", "2")
    status = appd.status()
    pids = {g["master_pid"] for g in status["generations"]}
    pids |= {w["pid"] for g in status["generations"] for w in g["workers"]}
    assert len(pids) == 3
    with reaping_orphans() as reap:
        appd.proc.kill()
        appd.proc.wait(5)

        def all_gone():
            reap(pids)
            return not any(alive(pid) for pid in pids)

        wait_until(all_gone, 5, message="masters and workers to exit after the daemon's SIGKILL")
        wait_until(lambda: (reap(pids), not any(psutil.pid_exists(p) for p in pids))[1], 5,
                   message="the orphans to be reaped")


# --- applications ---

def test_flask_app_serves_get_and_json_post(start_appd):
    appd = start_appd("flaskapp:app", "-w", "2")
    status, _, body = appd.get("/")
    assert status == 200 and body == b"hello from flask\n"
    payload = {"name": "widget", "tags": ["a", "b"], "size": 3}
    data = json.dumps(payload).encode()
    status, headers, body = appd.get("/items", method="POST", body=data,
                                     headers={"Content-Type": "application/json"})
    assert status == 201, body
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"received": payload, "length": len(data)}


@pytest.fixture(scope="module")
def probe_appd(tmp_path_factory):
    """One `core_probe:app` worker for the tests that send it failing or garbage
    requests; each checks that this worker survives and serves."""
    with running_appd(tmp_path_factory.mktemp("probe"), "core_probe:app", "-w", "1") as appd:
        yield appd


def test_app_exception_gives_500_and_the_worker_keeps_serving(probe_appd):
    appd = probe_appd
    [worker] = worker_pids(appd)
    status, _, body = appd.get("/crash")
    assert status == 500
    assert b"deliberate failure" not in body, "the traceback must not leak to the client"
    for _ in range(3):
        status, _, body = appd.get("/")
        assert status == 200 and body == f"pid {worker}".encode()
    wait_until(lambda: "RuntimeError: core_probe: deliberate failure" in appd.log(), 5,
               message="the traceback in the log")
    assert worker_pids(appd) == {worker}


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",  # a TLS hello
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    b"NOT A REQUEST AT ALL\r\n\r\n",
], ids=["tls-hello", "bad-header", "nonsense"])
def test_garbage_request_gets_400_and_the_service_keeps_serving(probe_appd, garbage):
    appd = probe_appd
    [worker] = worker_pids(appd)
    reply = raw_exchange(appd.address, garbage)
    assert reply.startswith(b"HTTP/1.1 400 ") or reply.startswith(b"HTTP/1.0 400 "), reply[:200]
    status, _, body = appd.get("/")
    assert status == 200 and body == f"pid {worker}".encode()
    assert worker_pids(appd) == {worker}


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_preload_app_imports_once_in_the_master(start_appd, preload):
    appd = start_appd("core_probe:app", "-w", "2", *(["--preload-app"] if preload else []))
    generation = appd.serving_generation()
    # Two concurrent slow requests: each sync worker can take only one.
    requests = [Background(appd.address, "/import-pid?s=0.5") for _ in range(2)]
    answers = []
    for request in requests:
        status, _, body = request.join()
        assert status == 200, body
        answers.append(tuple(int(x) for x in body.split()))
    serving = {server for _, server in answers}
    assert serving == {w["pid"] for w in generation["workers"]}, "both workers should have answered"
    for imported, server in answers:
        if preload:
            assert imported == generation["master_pid"] != server
        else:
            assert imported == server


# --- logging ---

def test_access_log_has_one_line_per_request_and_follows_reopen(start_appd, tmp_path):
    access = tmp_path / "access.log"
    appd = start_appd("core_probe:app", "-w", "2", "--access-log", str(access), "--log-format", "json")
    address = appd.address
    for path in ("/", "/?a=1", "/import-pid", "/missing"):
        assert http_get(address, path)[0] == 200
    lines = wait_until(lambda: (l := json_lines(access.read_text())) and len(l) >= 4 and l, 5,
                       message="four access log lines")
    assert len(lines) == 4
    assert sorted(r["path"] for r in lines) == sorted(["/", "/?a=1", "/import-pid", "/missing"])
    workers = worker_pids(appd)
    for record in lines:
        assert record["event"] == "access" and record["method"] == "GET" and record["status"] == 200
        assert record["generation"] == 1 and record["pid"] in workers

    rotated = tmp_path / "access.log.1"
    access.rename(rotated)
    result = appd.ctl("reopen-logs")
    assert result.returncode == 0, result.stderr

    def every_worker_writes_the_new_file():
        http_get(address, "/")
        return access.exists() and {r["pid"] for r in json_lines(access.read_text())} >= workers

    wait_until(every_worker_writes_the_new_file, 10, message="every worker to write the reopened file")
    after = [f"/after-{n}" for n in range(6)]
    for path in after:
        assert http_get(address, path)[0] == 200
    wait_until(lambda: {r["path"] for r in json_lines(access.read_text())} >= set(after), 5,
               message="the new requests in the new file")
    new_paths = [r["path"] for r in json_lines(access.read_text())]
    assert all(new_paths.count(path) == 1 for path in after)
    assert all(r["path"] in ("/", "/?a=1", "/import-pid", "/missing") for r in json_lines(rotated.read_text())), \
        "after reopen nothing may go to the rotated file"


def test_json_log_lines_carry_generation_and_pid(start_appd):
    appd = start_appd("core_probe:app", "-w", "2", "--log-format", "json", "--log-level", "debug")
    generation = appd.serving_generation()
    workers = {w["pid"] for w in generation["workers"]}
    records = json_lines(appd.log())  # every line must be JSON
    assert records
    for record in records:
        assert isinstance(record.get("generation"), int) and isinstance(record.get("pid"), int), record
    by_pid = {}
    for record in records:
        by_pid.setdefault(record["pid"], set()).add(record["generation"])
    # The daemon belongs to no generation (0); its lines about one name it.
    assert 0 in by_pid[appd.pid] and by_pid[appd.pid] <= {0, 1}
    assert by_pid[generation["master_pid"]] == {1}
    assert any(pid in by_pid and by_pid[pid] == {1} for pid in workers), "worker lines carry their generation"
    assert any(r["event"] == "daemon_started" and r["pid"] == appd.pid for r in records)
    assert any(r["event"] == "master_started" and r["pid"] == generation["master_pid"] for r in records)


# --- process identity ---

def test_process_titles_name_role_and_generation(start_appd):
    appd = start_appd("-w", "2")
    generation = appd.serving_generation()
    assert "appd: daemon" in " ".join(psutil.Process(appd.pid).cmdline())
    master = " ".join(psutil.Process(generation["master_pid"]).cmdline())
    assert "appd: master gen 1" in master
    for worker in generation["workers"]:
        assert "appd: worker gen 1" in " ".join(psutil.Process(worker["pid"]).cmdline())


def test_pidfile_holds_the_daemon_pid_and_is_removed_at_exit(start_appd, tmp_path):
    pidfile = tmp_path / "appd.pid"
    appd = start_appd("--pidfile", str(pidfile))
    assert pidfile.read_text().strip() == str(appd.pid)
    assert not list(tmp_path.glob("appd.pid.*")), "no temporary file left from the atomic write"
    appd.stop()
    assert appd.proc.returncode == 0
    assert not pidfile.exists()
