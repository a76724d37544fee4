"""The reliability tests' app, steered by files in the directory that
RELIABILITY_STATE names:

- if `fail` exists at import, the process prints why and exits with code 1 at
  once (with --preload-app that is the master: every new generation dies at
  boot, a deterministic crash loop until the file is removed);
- every import appends its pid to `imports`;
- /slow?s=N creates `busy-<pid>`, sleeps N seconds, removes it and answers
  (so a test knows a request is in flight).
"""

import os
import time
from pathlib import Path
from urllib.parse import parse_qs

_STATE = Path(os.environ.get("RELIABILITY_STATE", "."))

if (_STATE / "fail").exists():
    print(f"reliability_app: {_STATE / 'fail'} exists, refusing to start", flush=True)
    os._exit(1)

with open(_STATE / "imports", "a") as _imports:
    _imports.write(f"{os.getpid()}\n")


def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
        marker = _STATE / f"busy-{os.getpid()}"
        marker.touch()
        try:
            time.sleep(seconds)
        finally:
            marker.unlink()
    body = f"generation {os.environ.get('APPD_GENERATION')} pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
