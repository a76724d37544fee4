# Django-style gunicorn.conf.py: gthread, recycling, a child_exit hook without statsd.
import multiprocessing
import os

bind = "0.0.0.0:8000"
workers = min(multiprocessing.cpu_count() * 2 + 1, 3)
worker_class = "gthread"
threads = 4
max_requests = 1000
max_requests_jitter = 50
timeout = 120
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("ACCESS_LOG", "-")
errorlog = "-"
loglevel = "info"
worker_tmp_dir = "/dev/shm"
raw_env = ["DJANGO_SETTINGS_MODULE=shop.settings.production"]
wsgi_app = "gunicorn_apps:whoami"
forwarded_allow_ips = "*"


def child_exit(server, worker):
    # What Django shops do instead of statsd: note the exit for the cleanup job.
    with open(os.path.join(os.environ["MARKERS"], "child_exit"), "a") as f:
        f.write(f"{worker.pid} {worker.age}\n")
    server.log.info("worker %s exited", worker.pid)
