"""Apps the gunicorn.conf.py tests serve (tests/gunicorn_configs/)."""

import json
import logging
import os

from flask import Flask, request, url_for


def whoami(environ, start_response):
    """Who serves, as whom, and what the request looked like after the proxy layer."""
    if environ["PATH_INFO"] == "/hang":
        import time
        time.sleep(60)  # until the master's timeout aborts this worker
    if environ["PATH_INFO"] == "/log":
        logging.getLogger("shop.orders").info("order placed %s", environ.get("QUERY_STRING"))
        print("printed by the app", flush=True)
    body = json.dumps({
        "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "umask": _umask(), "env": {k: os.environ.get(k) for k in ("DJANGO_SETTINGS_MODULE", "GREETING")},
        "remote_addr": environ.get("REMOTE_ADDR"), "scheme": environ["wsgi.url_scheme"],
        "script_name": environ.get("SCRIPT_NAME"), "path_info": environ.get("PATH_INFO"),
        "multithread": environ["wsgi.multithread"],
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("X-Served-By", str(os.getpid()))])
    return [body]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


flask_app = Flask(__name__)


@flask_app.route("/")
def index():
    return {"external_url": url_for("index", _external=True), "remote_addr": request.remote_addr,
            "scheme": request.scheme}


def prometheus_app():
    """prometheus_client in multiprocess mode: PROMETHEUS_MULTIPROC_DIR must be set before import."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, multiprocess

    requests = Counter("shop_requests", "requests served")
    in_flight = Gauge("shop_workers_alive", "live workers", multiprocess_mode="livesum")
    in_flight.set(1)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/metrics":
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [generate_latest(registry)]
        requests.inc()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    return app


def appd_style_post_fork(worker):
    """appd's original one-argument hook: gets appd's Worker itself."""
    with open(os.path.join(os.environ["MARKERS"], "appd_post_fork"), "a") as f:
        f.write(f"{os.getpid()} {worker.serial} {worker.generation}\n")
