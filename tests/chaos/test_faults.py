"""Fault injection, long: APPD_FUZZ_EXAMPLES (default 400) fuzzed config
files through reload and as many fuzzed argument maps through every command;
no daemon death, and `status` stays fast meanwhile (p99 under 50 ms)."""

from __future__ import annotations

import pytest

from chaos.faults import BASELINE, examples, print_faults, run_faults


@pytest.mark.timeout(3600)
def test_fuzzed_configs_and_commands_never_kill_the_daemon(start_appd, tmp_path):
    config = tmp_path / "appd.toml"
    config.write_text(BASELINE)
    appd = start_appd("--config", str(config), "--boot-timeout", "20")
    count = examples()
    figures = run_faults(appd, config, count=count)
    print_faults(figures)
    assert figures["configs"] == count and figures["commands"] == count
    assert not figures["probe"].errors, figures["probe"].errors[:5]
    assert figures["probe"].percentile(0.99) < 0.050, figures["probe"].summary()
    assert appd.proc.poll() is None and appd.get("/")[0] == 200
