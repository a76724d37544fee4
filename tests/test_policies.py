"""Production policies: drain_delay (not ready first, still serving, then drain)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import APPDCTL, wait_until


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
