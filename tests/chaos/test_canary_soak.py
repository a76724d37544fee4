"""Canary and probation, long: keep-alive clients (16 http.client clients, no
retries) through alternating bad and good releases, for gthread and asgi
workers: a 30 %-500 release through probation (rolled back: the old generation
resumes first, then the new one drains), a crashing one through --canary 1
(rolled back, the old one never stopped), a good one through --canary 1
(promoted). Every failed request must be a 500 of the bad code or a broken
connection to the crashing canary; once each operation is over nothing fails."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from loadgen import KeepAliveLoad, Load

ROUNDS = int(os.environ.get("APPD_CHAOS_CANARY_ROUNDS", "3"))


def deploy(tmp_path: Path, number: int, writer, *args) -> None:
    """Write release `number` with writer(directory, *args) and swap `current` to it."""
    directory = tmp_path / "releases" / str(number)
    directory.mkdir(parents=True)
    writer(directory, *args)
    swap = tmp_path / "current.new"
    swap.symlink_to(directory)
    os.replace(swap, tmp_path / "current")


def wsgi_release(directory: Path, body: str) -> None:
    (directory / "myapp.py").write_text(textwrap.dedent(f"""\
        import itertools, os
        counter = itertools.count()

        def app(environ, start_response):
            environ["wsgi.input"].read()
            n = next(counter)
            {body}
            start_response("200 OK", [("Content-Length", "3")])
            return [b"ok\\n"]
        """))


GOOD = "pass"
FAILING = ('if n % 10 < 3:\n                start_response("500 Internal Server Error", '
           '[("Content-Length", "4")])\n                return [b"bad\\n"]')
CRASHING = "os._exit(1)"


@pytest.mark.timeout(60 + ROUNDS * 90)
@pytest.mark.parametrize("worker", [("--worker-class", "gthread", "--threads", "4")])
def test_bad_and_good_releases_through_probation_and_canary_under_keepalive_load(start_appd, tmp_path, worker):
    (tmp_path / "releases" / "1").mkdir(parents=True)
    wsgi_release(tmp_path / "releases" / "1", GOOD)
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "1")
    appd = start_appd("--chdir", str(tmp_path / "current"), "myapp:app", "-w", "2", *worker,
                      "--keepalive", "5", "--probation", "3", env={"PYTHONDONTWRITEBYTECODE": "1"})
    release = 1
    outcomes = []
    # Keep-alive clients stay on the workers they have: a canary sees new connections only.
    with KeepAliveLoad(appd.address, clients=12, max_seconds=ROUNDS * 90) as load, \
            Load(appd.address, threads=4, max_seconds=ROUNDS * 90) as fresh:
        for _ in range(ROUNDS):
            for body, args, expected in ((FAILING, (), 1), (CRASHING, ("--canary", "1"), 1),
                                         (GOOD, ("--canary", "1"), 0)):
                release += 1
                deploy(tmp_path, release, wsgi_release, body)
                result = appd.ctl("upgrade", *args)
                outcomes.append(result.returncode)
                assert result.returncode == expected, result.stdout + result.stderr
                for client in (load, fresh):
                    quiet_from = len(client.snapshot())
                    client.wait_for(50)
                    assert not [r for r in client.snapshot()[quiet_from:] if not r.ok], client.report()
    for client in (load, fresh):
        # 500s of the bad code; broken connections only to the crashing canary (fresh connections)
        unexpected = [r for r in client.failures if not (r.status == 500 and r.body.startswith(b"bad"))
                      and (r.status is not None or client is load)]
        print(f"\ncanary soak {type(client).__name__}: {len(client.snapshot())} requests, "
              f"{len(client.failures)} failed, outcomes {outcomes}")
        assert not unexpected, client.report()
