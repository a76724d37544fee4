"""A command worker written in plain Python: it serves HTTP on the socket it
inherits as LISTEN_FDS (fd 3) and says READY=1 on NOTIFY_SOCKET, as a
systemd socket-activated service would. NO_READY=1 makes it never say it.

SIGTERM is graceful and race-free: the handler only records it, and the loop
checks the record between connections. A handler that exited at once would
race accept(): a connection accepted just before the signal would be closed
unanswered (a RST to the client) instead of staying in the shared backlog for
the next generation."""

import os
import select
import signal
import socket
import sys
import time

stopping = False


def on_term(signum, frame):
    global stopping
    stopping = True


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def main() -> None:
    assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID must be our pid"
    count = int(os.environ["LISTEN_FDS"])
    listener = socket.socket(fileno=3)
    listener.setblocking(False)
    version = os.environ.get("APP_VERSION", "v1")
    if os.environ.get("FAIL_AT_START"):
        raise SystemExit("notify_server: refusing to start, FAIL_AT_START is set")
    time.sleep(float(os.environ.get("BOOT_SECONDS", "0")))
    if not os.environ.get("NO_READY"):
        notify("READY=1")
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)  # so a TERM wakes select() rather than resuming it
    signal.signal(signal.SIGTERM, on_term)
    while True:
        readable, _, _ = select.select([listener, wake_read], [], [])
        if stopping:
            return
        if wake_read in readable:
            os.read(wake_read, 512)
        if listener not in readable:
            continue
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue  # a sibling worker took it
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            body = f"command worker {version} pid {os.getpid()} fds {count}\n".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))


if __name__ == "__main__":
    sys.exit(main())
