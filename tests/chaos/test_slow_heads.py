"""Twenty clients that send half a request head and go quiet, against two sync
workers whose head deadline (6 s) is longer than the master's hang timeout
(5 s): every stalled client gets 408, a normal request queued behind them is
served within the bound the deadline sets, and no worker is killed as hung
(about a minute)."""

from __future__ import annotations

from test_header_timeout import check_slow_heads


def test_twenty_stalled_heads_longer_than_the_worker_timeout(start_appd):
    appd = start_appd("conformance_app:app", "-w", "2", "--timeout", "5", "--header-timeout", "6")
    check_slow_heads(appd, count=20, workers=2, header_timeout=6.0)
