# Most of gunicorn's server hooks, each writing one marker line per call.
import os

workers = 2
wsgi_app = "gunicorn_apps:whoami"
MARKERS = os.environ["MARKERS"]


def mark(hook, *details):
    with open(os.path.join(MARKERS, hook), "a") as f:
        f.write(" ".join(str(d) for d in (os.getpid(), *details)) + "\n")


def on_starting(server):
    mark("on_starting", server.pid)


def when_ready(server):
    mark("when_ready", server.num_workers)


def pre_fork(server, worker):
    mark("pre_fork", worker.age)


def post_fork(server, worker):
    mark("post_fork", worker.pid, worker.age, server.pid)


def post_worker_init(worker):
    mark("post_worker_init", worker.pid, worker.alive)


def pre_request(worker, req):
    mark("pre_request", req.method, req.path, req.query, dict(req.headers).get("X-TRACE", "-"))


def post_request(worker, req, environ, resp):
    mark("post_request", req.path, resp.status_code, environ["REQUEST_METHOD"])


def child_exit(server, worker):
    mark("child_exit", worker.pid)


def worker_exit(server, worker):
    mark("worker_exit", worker.pid)


def worker_int(worker):
    mark("worker_int", worker.pid)


def worker_abort(worker):
    mark("worker_abort", worker.pid)


def nworkers_changed(server, new_value, old_value):
    mark("nworkers_changed", new_value, old_value)


def pre_exec(server):
    mark("pre_exec")


def on_reload(server):
    mark("on_reload")


def on_exit(server):
    mark("on_exit")
