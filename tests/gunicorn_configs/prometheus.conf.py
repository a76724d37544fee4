# prometheus_client's documented multiprocess setup.
import os
import shutil

from prometheus_client import multiprocess

workers = 2
wsgi_app = "gunicorn_apps:prometheus_app()"
raw_env = ["PROMETHEUS_MULTIPROC_DIR=" + os.environ["METRICS_DIR"]]


def on_starting(server):
    # A fresh directory at each start, as the docs recommend.
    directory = os.environ["METRICS_DIR"]
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
