"""drain_delay behind a real load balancer: HAProxy (from Debian) balances two
appd instances and health-checks each one's /readyz on its metrics listener.
One instance is drained under load; what the clients saw is counted. With a
drain_delay longer than the checks take to notice (fall × inter), /readyz
turns 503 first, HAProxy stops routing there, and only then does the listener
stop accepting: no client error. Without it, the requests HAProxy still sends
to the stopped instance fail (503 from HAProxy: plain config, no redispatch).

    with haproxy_checking_readyz(tmp_path, [(a.address, a_metrics), (b.address, b_metrics)]) as proxy:
        figures = drain_one_under_load(proxy.address, drain=lambda: stop(a))
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from loadgen import Load
from proxies import running_proxy


def readyz_config(inter: float, fall: int):
    def make(scratch: Path, port: int, upstreams) -> str:
        servers = "\n".join(f"    server s{i} {address} check port {metrics.rpartition(':')[2]}"
                            for i, (address, metrics) in enumerate(upstreams))
        return f"""global
    maxconn 1000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 1s
frontend front
    bind 127.0.0.1:{port}
    default_backend appd
backend appd
    balance roundrobin
    option httpchk GET /readyz
    default-server inter {int(inter * 1000)}ms fall {fall} rise 1
{servers}
"""
    return make


@contextlib.contextmanager
def haproxy_checking_readyz(directory: Path, upstreams, inter: float = 1.0, fall: int = 2):
    """upstreams: [(service address, metrics address)] of each appd."""
    with running_proxy("haproxy", directory, upstreams, make_config=readyz_config(inter, fall)) as proxy:
        yield proxy


def drain_one_under_load(address: str, drain, threads: int = 8, after: int = 50) -> dict:
    """Load through `address`, call drain() (returns once the drained appd exited),
    then go on until `after` more requests: every request the clients sent, counted."""
    with Load(address, threads=threads, max_seconds=120.0) as load:
        load.wait_for(after)
        drain()
        load.wait_for(after)
    failures = load.failures
    kinds: dict[str, int] = {}
    for failure in failures:
        kind = f"HTTP {failure.status}" if failure.status else (failure.error or "?").split("(")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"requests": len(load.snapshot()), "errors": len(failures), "kinds": kinds}
