"""A probe app for tests/test_core.py and tests/test_check.py.

    /            "pid <serving pid>"
    /import-pid  "<pid that imported this module> <serving pid>" (preload_app);
                 ?s=N sleeps N s first, so concurrent requests reach different workers
    /slow?s=N    touches $CORE_MARK_DIR/started-<pid> (when set), then sleeps N s
    /crash       raises (the server must answer 500 and keep going)

If CORE_IMPORT_PID_FILE is set, the importing process writes its pid there.
"""

import os
import time
from urllib.parse import parse_qs

IMPORT_PID = os.getpid()
if os.environ.get("CORE_IMPORT_PID_FILE"):
    with open(os.environ["CORE_IMPORT_PID_FILE"], "w") as f:
        f.write(str(IMPORT_PID))


def _text(start_response, text: str, status: str = "200 OK"):
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    path = environ["PATH_INFO"]
    seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["0"])[0])
    if path == "/import-pid":
        time.sleep(seconds)
        return _text(start_response, f"{IMPORT_PID} {os.getpid()}")
    if path == "/slow":
        mark_dir = os.environ.get("CORE_MARK_DIR")
        if mark_dir:
            open(os.path.join(mark_dir, f"started-{os.getpid()}"), "w").close()
        time.sleep(seconds)
        return _text(start_response, f"slept {seconds} in pid {os.getpid()}")
    if path == "/crash":
        raise RuntimeError("core_probe: deliberate failure")
    return _text(start_response, f"pid {os.getpid()}")
