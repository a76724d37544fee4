"""The control socket under abuse: 1,000 connections opened and dropped and
10,000 seeded random frames (valid length with random msgpack or garbage
bodies, oversized lengths, truncated frames, pipelined requests) from another
process, while a client holds a half-written frame. Every frame gets the
answer the protocol owes it; meanwhile `status` stays fast (p99 under 50 ms),
a scale +1 then -1 is carried out exactly, and afterwards the service serves
and the daemon holds what it held before."""

from __future__ import annotations

import pytest

from chaos.scenarios import chaos_seed, control_abuse, print_abuse, unexpected


@pytest.mark.timeout(240)
def test_control_socket_abuse_leaves_status_fast_and_operations_exact(start_appd):
    appd = start_appd("-w", "2")
    seed = chaos_seed()
    print(f"\nAPPD_CHAOS_SEED={seed}")
    figures = control_abuse(appd, seed, frames=10_000, drops=1_000, wait_half_frame_closed=True)
    print_abuse(figures)
    stats, probe = figures["stats"], figures["probe"]

    assert sum(v for k, v in stats.items() if k.startswith("frame:")) == 10_000
    assert sum(v for k, v in stats.items() if k.startswith("dropped:")) == 1_000
    assert not unexpected(stats), stats
    assert stats["reply:bad_request"] > 2_000 and stats["closed_by_daemon"] > 1_000, stats
    assert not probe.errors, probe.errors[:5]
    assert probe.percentile(0.99) < 0.050, probe.summary()
    assert figures["half_closed"], "the half-written frame must be closed by the daemon"

    up, down = figures["scaled"]
    assert up["during_abuse"] and down["during_abuse"], "the scale must overlap the abuse"
    assert (up["result"]["target"], up["ready"]) == (3, 3)
    assert (down["result"]["target"], down["ready"]) == (2, 2)
    final = figures["final"]
    assert final["generations"][0]["id"] == figures["generation"], "the abuse must not restart anything"
    assert final["last_operation"]["op"] == "scale" and final["last_operation"]["ok"]
    assert appd.get("/")[0] == 200
    assert appd.proc.poll() is None
    assert abs(figures["after"].fds - figures["before"].fds) <= 2, (figures["before"].fd_targets,
                                                                    figures["after"].fd_targets)
