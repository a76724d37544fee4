"""The asgi worker with real apps (FastAPI, Starlette WebSockets, Django's ASGI
handler) under a real appd: HTTP features, keep-alive load across upgrades
with no failed request, lifespan, hung detection, WebSockets closed with 1012."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from conftest import Background, running_appd, wait_until
from loadgen import Load, Result
from test_metrics import scrape, total

pytest.importorskip("fastapi")
websockets_client = pytest.importorskip("websockets.sync.client")
pytest.importorskip("django")

ASGI = ("--worker-class", "asgi")


class KeepAliveLoad(Load):
    """Load whose threads keep their connection (GET and POST in turn), as a
    browser or a proxy's upstream pool does; a `Connection: close` answer makes
    http.client reconnect for the next request."""

    def __init__(self, address: str, path: str = "/", post_path: str | None = None, **kw):
        super().__init__(address, path=path, **kw)
        self.post_path = post_path
        self.local = threading.local()

    def _one(self) -> Result:
        started = time.monotonic()
        conn = getattr(self.local, "conn", None)
        if conn is None:
            host, _, port = self.address.rpartition(":")
            conn = self.local.conn = http.client.HTTPConnection(host, int(port), timeout=self.request_timeout)
        self.local.turn = turn = getattr(self.local, "turn", 0) + 1
        try:
            if self.post_path and turn % 2:
                conn.request("POST", self.post_path, body=b"x" * 3000)
            else:
                conn.request("GET", self.path)
            response = conn.getresponse()
            body = response.read()
            return Result(started, time.monotonic() - started, response.status, None, body[:200])
        except Exception as exc:
            conn.close()
            self.local.conn = None
            return Result(started, time.monotonic() - started, None, repr(exc))


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def read_response(f) -> tuple[int, dict, bytes]:
    from http_harness import read_response as read
    return read(f)


# --- FastAPI: one appd for the module ---

@pytest.fixture(scope="module")
def fastapi_appd(tmp_path_factory):
    # keepalive 15 s: an idle connection must outlive the steps of an upgrade test
    # on a loaded machine, or http.client silently reconnects to the new code.
    directory = tmp_path_factory.mktemp("fastapi")
    with running_appd(directory, "asgi_fastapi:app", *ASGI, "-w", "2", "--ready-check", "/healthz",
                      "--keepalive", "15", "--metrics-bind", "127.0.0.1:0", env={"SHUTDOWN_MARKER": str(directory / "shutdown")}) as appd:
        yield appd


def test_fastapi_json_state_stream_upload(fastapi_appd):
    status, headers, body = fastapi_appd.get("/")
    assert status == 200 and json.loads(body)["version"] == "v1"
    status, _, body = fastapi_appd.get("/state")
    assert json.loads(body) == {"greeting": "hello from v1"}, "the dependency reads lifespan state"
    status, headers, body = fastapi_appd.get("/stream?parts=50&size=1000")
    assert status == 200 and headers.get("transfer-encoding") == "chunked"
    assert body == b"".join(str(i % 10).encode() * 1000 for i in range(50))
    payload = bytes(range(256)) * 2000
    boundary = "appdboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    status, _, body = fastapi_appd.get("/upload", method="POST", body=form,
                                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    import hashlib
    assert json.loads(body) == {"name": "a.bin", "size": len(payload), "md5": hashlib.md5(payload).hexdigest()}


def test_fastapi_pipelining_and_100_continue(fastapi_appd):
    with socket.create_connection(host_port(fastapi_appd.address), timeout=10) as sock:
        sock.sendall(b"GET /state HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                     b"GET /stream?parts=2&size=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        f = sock.makefile("rb")
        answers = [read_response(f) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert json.loads(answers[1][2])["length"] == 5 and answers[2][2] == b"000111"
        # 100-continue: the body is sent only once the server asks for it.
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        sock.sendall(b"abcd")
        status, _, body = read_response(f)
        assert status == 200 and json.loads(body)["length"] == 4


def test_status_reports_busy_requests(fastapi_appd):
    slow = Background(fastapi_appd.address, "/sleep?seconds=2")

    def busy_worker():
        workers = fastapi_appd.serving_generation()["workers"]
        return [w for w in workers if w["busy"] == 1 and w["request_age_s"] > 0]
    wait_until(busy_worker, 10, message="a worker reporting a busy request")
    assert slow.join()[0] == 200


def test_fastapi_keepalive_load_across_upgrade_loses_nothing(fastapi_appd):
    """Keep-alive GET and POST load across an upgrade, with no failed request. An
    idle kept-alive connection of an old worker is handed to the new generation:
    its next request runs the new code, kept alive. A request in progress at the
    stop and two pipelined behind it are all answered by the old worker, kept
    alive, and then that connection too goes to the new generation."""
    appd = fastapi_appd
    old_pids = {w["pid"] for w in appd.serving_generation()["workers"]}
    before = appd.serving_generation()["id"]
    release = appd.tmp / "release"
    pipelined = socket.create_connection(host_port(appd.address), timeout=30)
    replies = pipelined.makefile("rb")
    idle = http.client.HTTPConnection(*host_port(appd.address), timeout=30)
    idle.request("GET", "/")
    assert json.loads(idle.getresponse().read())["version"] == "v1"
    handed_before = total(scrape(appd), "appd_handed_off_connections_total")
    with KeepAliveLoad(appd.address, path="/", post_path="/echo", threads=6) as load:
        pipelined.sendall(f"GET /hold?path={release} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                          + b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /state HTTP/1.1\r\nHost: x\r\n\r\n")
        result = appd.ctl("upgrade", "--no-wait", "--env", "APP_VERSION=v2")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: appd.serving_generation()["id"] == before + 1, 30, message="the cutover")
        wait_until(lambda: all(w["state"] == "stopping" for g in appd.status()["generations"]
                               if g["id"] == before for w in g["workers"]), 30,
                   message="the old workers told to stop")
        # "stopping" is the master's view once it sent TERM; the worker hands its idle
        # connections on when it handles that signal, a moment later under load.
        wait_until(lambda: total(scrape(appd), "appd_handed_off_connections_total") > handed_before, 20,
                   message="the old workers' idle connections handed on")
        idle.request("GET", "/")  # handed on: no close, no reconnect, the new code
        response = idle.getresponse()
        assert json.loads(response.read())["version"] == "v2", "answered by the new generation"
        assert response.getheader("connection") is None
        release.touch()  # the held request ends now, in a stopping worker (both got TERM at once)
        answers = [read_response(replies) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert json.loads(answers[1][2])["version"] == "v1", "answered by the old generation"
        assert [a[1].get("connection") for a in answers] == [None, None, None], answers
        pipelined.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(replies)
        assert status == 200 and json.loads(body)["version"] == "v2", "handed on after its last answer"
        pipelined.close()
        load.wait_for(100)
        wait_until(lambda: appd.status()["last_operation"] == {**appd.status()["last_operation"],
                                                               "op": "upgrade", "outcome": "done"}, 30,
                   message="the upgrade to finish")
    idle.close()
    assert not load.failures, load.report()
    versions = {json.loads(r.body)["version"] for r in load.results}
    assert versions == {"v1", "v2"}, "the load should span the cutover"
    marker = appd.tmp / "shutdown"
    wait_until(lambda: marker.exists() and {int(p) for p in marker.read_text().split()} >= old_pids,
               15, message="lifespan shutdown in every old worker")


def test_lifespan_startup_failure_rolls_back_with_the_apps_message(fastapi_appd):
    before = fastapi_appd.serving_generation()
    code, reply = fastapi_appd.ctl_json("upgrade", "--env", "FAIL_STARTUP=1")
    assert code == 1 and reply["error"]["code"] == "rolled_back", reply
    text = reply["error"]["reason"] + reply["error"].get("output", "")
    assert "database unreachable (FAIL_STARTUP is set)" in text, reply
    assert fastapi_appd.serving_generation()["id"] == before["id"]
    assert fastapi_appd.get("/")[0] == 200


# --- a handler that blocks the loop ---

def test_handler_blocking_the_loop_is_found_hung(start_appd):
    appd = start_appd("asgi_raw:app", *ASGI, "-w", "1", "--timeout", "1")
    pid = appd.serving_generation()["workers"][0]["pid"]
    blocked = Background(appd.address, "/block", timeout=30)
    wait_until(lambda: "worker_timeout" in appd.log() and "block_the_event_loop" in appd.log(), 20,
               message="the hung worker's traceback in the log")
    assert not isinstance(blocked.join(), tuple), "the blocked request cannot have been answered"
    wait_until(lambda: [w["pid"] for w in appd.serving_generation()["workers"]] not in ([], [pid]), 20,
               message="a replacement worker")
    assert appd.get("/")[0] == 200


# --- WebSockets ---

def test_websocket_echo_gets_1012_on_upgrade_and_reconnects(start_appd, tmp_path):
    from websockets.exceptions import ConnectionClosed
    marker = tmp_path / "disconnects"
    appd = start_appd("asgi_ws:app", *ASGI, "-w", "2", env={"DISCONNECT_MARKER": str(marker)})
    url = f"ws://{appd.address}/ws"
    stack = contextlib.ExitStack()
    clients = [stack.enter_context(websockets_client.connect(url, open_timeout=10)) for _ in range(4)]
    for ws in clients:
        assert ws.recv(timeout=10) == "hello v1"
        ws.send("ping")
        assert ws.recv(timeout=10) == "ping"
    code, result = appd.ctl_json("upgrade", "--env", "APP_VERSION=v2")
    assert code == 0, result
    for ws in clients:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, closed.value
    stack.close()
    wait_until(lambda: marker.exists() and marker.read_text().split() == ["1012"] * 4, 10,
               message="the app told websocket.disconnect 1012 in every connection")
    with websockets_client.connect(url, open_timeout=10) as ws:
        assert ws.recv(timeout=10) == "hello v2"


# --- Django ---

def test_django_asgi_across_upgrade(start_appd):
    appd = start_appd("django_asgi.asgi:application", *ASGI, "-w", "2", "--keepalive", "5")
    assert appd.get("/")[2] == b"django v1\n"
    status, _, body = appd.get("/echo", method="POST", body=b"abc")
    assert json.loads(body) == {"method": "POST", "length": 3}
    with KeepAliveLoad(appd.address, path="/", threads=4) as load:
        code, result = appd.ctl_json("upgrade", "--env", "APP_VERSION=v2")
        assert code == 0, result
        load.wait_for(50)
    assert not load.failures, load.report()
    assert {r.body for r in load.results} == {b"django v1\n", b"django v2\n"}


def test_websocket_drain_timeout_on_plain_asyncio(start_appd, tmp_path):
    """With websocket_drain_timeout the old generation's WebSockets keep working that
    long before the 1012 close. Run without uvloop (hidden), on asyncio's own loop."""
    from websockets.exceptions import ConnectionClosed
    hidden = tmp_path / "no_uvloop"
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    appd = start_appd("asgi_ws:app", *ASGI, "-w", "1", "--websocket-drain-timeout", "1",
                      env={"PYTHONPATH": str(hidden)})
    with websockets_client.connect(f"ws://{appd.address}/ws", open_timeout=10) as ws:
        assert ws.recv(timeout=10) == "hello v1"
        before = appd.serving_generation()["id"]
        assert appd.ctl("upgrade", "--no-wait").returncode == 0
        wait_until(lambda: appd.serving_generation()["id"] == before + 1, 30, message="the cutover")
        drained_at = time.monotonic()
        ws.send("still here")
        assert ws.recv(timeout=10) == "still here", "the draining worker still serves its WebSocket"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1012
        assert time.monotonic() - drained_at > 0.3
