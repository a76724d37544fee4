"""Fault injection in `make test`: a few hypothesis examples of fuzzed config
files through reload and fuzzed argument maps through every command; the
daemon stays alive and `status` answers after each (tests/chaos/faults.py;
`make chaos` runs many more)."""

from __future__ import annotations

import pytest

from chaos.faults import BASELINE, print_faults, run_faults


@pytest.mark.timeout(120)
def test_fuzzed_configs_and_commands_never_kill_the_daemon(start_appd, tmp_path):
    config = tmp_path / "appd.toml"
    config.write_text(BASELINE)
    appd = start_appd("--config", str(config), "--boot-timeout", "20")
    figures = run_faults(appd, config, count=40)
    print_faults(figures)
    assert figures["configs"] == 40 and figures["commands"] == 40
    assert not figures["probe"].errors, figures["probe"].errors[:5]
    assert appd.proc.poll() is None and appd.get("/")[0] == 200
