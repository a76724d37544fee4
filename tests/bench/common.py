"""What every benchmark scenario shares: the run's Context (sizes, servers,
scratch directories), a table Row, and the apps they serve."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from servers import AppdServer, GunicornServer

HELLO, SLOW, FLASK = "bench_hello:app", "bench_slow_import:app", "bench_flask:app"
NOISY = 0.10  # a throughput run where other processes used more of the CPU than this is flagged


@dataclass
class Context:
    workdir: Path
    quick: bool
    use_wrk: bool
    log: callable = print
    _serial: int = 0

    # Sizes: full runs by default, small ones with --quick.
    @property
    def runs(self) -> int:
        return 1 if self.quick else 3

    @property
    def wrk_seconds(self) -> float:
        return 3.0 if self.quick else 10.0

    @property
    def operations(self) -> int:
        return 3 if self.quick else 20

    @property
    def upgrade_repeats(self) -> int:
        return 3 if self.quick else 10

    @property
    def ctl_repeats(self) -> int:
        return 5 if self.quick else 20

    @property
    def scale_repeats(self) -> int:
        return 2 if self.quick else 5

    def dir(self, name: str) -> Path:
        self._serial += 1
        return self.workdir / f"{self._serial:02d}-{name}"

    def appd(self, app: str, workers: int, **kwargs) -> AppdServer:
        return AppdServer(app, workers, self.dir(f"appd-{app.split(':')[0]}-{workers}w"), **kwargs)

    def gunicorn(self, app: str, workers: int, **kwargs) -> GunicornServer:
        return GunicornServer(app, workers, self.dir(f"gunicorn-{app.split(':')[0]}-{workers}w"), **kwargs)


@dataclass
class Row:
    scenario: str
    figure: str
    appd: float | None
    gunicorn: float | None
    unit: str                      # "rps", "s", "bytes", "count", "ratio"
    target: str = ""
    ok: bool | None = None         # None: no target for this figure
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.appd is None or self.gunicorn in (None, 0):
            return None
        return self.appd / self.gunicorn


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
