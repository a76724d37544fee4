"""The hello app behind an import that takes BENCH_IMPORT_SECONDS (default 2) seconds."""

import os
import time

time.sleep(float(os.environ.get("BENCH_IMPORT_SECONDS", "2")))

from bench_hello import app  # noqa: E402  (imported last: its ready marker follows the wait)

__all__ = ["app"]
