"""Fault injection with hypothesis (issue 14): arbitrary config files (random
bytes, deep nesting, huge numbers, wrong types) through `reload`, and
arbitrary argument maps through every command. After each one the daemon is
alive and `status` answers; a StatusProbe measures `status` meanwhile.

The examples are chosen so that luck cannot stop the service (drain and stop
only get invalid arguments) or make it huge (scale targets stay small or out
of range); any valid change is undone before the next example.

tests/test_faults.py runs a few examples in `make test`; tests/chaos/ runs
APPD_FUZZ_EXAMPLES (default 400) in `make chaos`.
"""

from __future__ import annotations

import collections
import os
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appdctl import Client, CommandError, protocol
from chaos.tools import StatusProbe
from conftest import wait_until

BASELINE = "workers = 1\n"
# Settings a fuzzed file may set: none that writes files, binds addresses or spawns many processes.
FUZZED_SETTINGS = ["timeout", "graceful_timeout", "boot_timeout", "keepalive", "backlog", "threads",
                   "limit_request_line", "limit_request_fields", "max_requests", "max_requests_jitter",
                   "log_level", "preload_app", "ready_check", "unix_socket_mode", "ready_delay",
                   "worker_connections", "control_socket_mode", "app", "log_format"]


def examples() -> int:
    return int(os.environ.get("APPD_FUZZ_EXAMPLES", "400"))


# --- arbitrary config files ---

_scalar = st.one_of(
    st.integers(), st.integers(min_value=10 ** 20, max_value=10 ** 400), st.floats(allow_nan=True),
    st.booleans(), st.text(max_size=20), st.just("\\u0000"), st.dates(), st.datetimes())


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"' \
            if value != "\\u0000" else '"a\\u0000b"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value).replace(" ", "T") if hasattr(value, "isoformat") else str(value)


_values = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("abc"), inner, max_size=2)), max_leaves=6)
_keys = st.one_of(st.sampled_from(FUZZED_SETTINGS), st.from_regex(r"\A[a-z_]{1,12}\Z"))


@st.composite
def config_files(draw) -> bytes:
    kind = draw(st.sampled_from(["settings", "plausible", "bytes", "deep", "huge", "latin1", "table"]))
    if kind == "plausible":  # often valid: the reload really replaces workers
        value = draw(st.one_of(st.integers(0, 40), st.floats(0, 5), st.booleans(),
                               st.sampled_from(["debug", "info", "json", "console", "/", "0600", "sync"])))
        return f"{draw(st.sampled_from(FUZZED_SETTINGS))} = {_toml_value(value)}\n".encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.integers(min_value=50, max_value=5000))
        return f"{draw(_keys)} = {'[' * depth}{']' * depth}\n".encode()
    if kind == "huge":
        digits = draw(st.integers(min_value=20, max_value=6000))
        return f"{draw(st.sampled_from(FUZZED_SETTINGS))} = 1{'0' * digits}\n".encode()
    if kind == "latin1":
        return draw(st.text(max_size=30)).encode("latin-1", "replace") + b"\n# caf\xe9\n"
    lines = [f"{draw(_keys)} = {_toml_value(draw(_values))}" for _ in range(draw(st.integers(1, 4)))]
    text = "\n".join(lines) + "\n"
    return (("[appd]\n" + text) if kind == "table" else text).encode("utf-8", "surrogatepass")


# --- arbitrary argument maps, per command ---

_msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1),
              st.floats(), st.text(max_size=20), st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)
_bad_duration = st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.just(float("inf")),
                          st.floats(min_value=1e10, allow_infinity=False), st.text(max_size=5), st.lists(st.none()))
_env = st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(["A=B", "", "LD_PRELOAD", "PYTHONPATH",
                                                                        "X\x00Y", "APPD_FUZZ"])),
                       st.one_of(st.text(max_size=12), st.just("a\x00b"), _msgpack_values), max_size=3)


_I64_MIN, _U64_MAX = -(2 ** 63), 2 ** 64 - 1  # what msgpack can carry


def _args_for(cmd: str):
    small_or_out = st.one_of(st.integers(_I64_MIN, 0), st.integers(65, _U64_MAX), st.integers(1, 2))
    per_command = {
        "drain": st.fixed_dictionaries({"timeout": _bad_duration}),
        "stop": st.fixed_dictionaries({"fuzz_guard": _msgpack_values}),  # never a valid stop
        "scale": st.one_of(st.fixed_dictionaries({"count": small_or_out}),
                           st.fixed_dictionaries({"delta": st.one_of(st.integers(_I64_MIN, -3), st.just(0),
                                                                     st.integers(70, _U64_MAX))}),
                           st.dictionaries(st.sampled_from(["count", "delta"]), _msgpack_values)),
        "upgrade": st.fixed_dictionaries({}, optional={"env": st.one_of(_env, _msgpack_values),
                                                        "wait": st.one_of(st.booleans(), _msgpack_values),
                                                        "daemon": st.one_of(st.booleans(), _msgpack_values)}),
        "retire": st.fixed_dictionaries({"pid": st.one_of(st.integers(_I64_MIN, _U64_MAX), _msgpack_values)}),
    }
    free = st.dictionaries(st.one_of(st.sampled_from(list(protocol.COMMANDS[cmd][1]) or ["x"]), st.text(max_size=8)),
                           _msgpack_values, max_size=3)
    return per_command.get(cmd, st.one_of(free, st.just({})))


commands = st.sampled_from(sorted(protocol.COMMANDS)).flatmap(lambda cmd: st.tuples(st.just(cmd), _args_for(cmd)))


# --- the run ---

class FaultRun:
    """Sends the examples to one running appd and checks it after each."""

    def __init__(self, appd, config_path):
        self.appd = appd
        self.config = config_path
        self.counts = collections.Counter()
        self.client = Client(appd.socket, timeout=120)

    def after_each(self) -> None:
        wait_until(lambda: self.client.call("status")["operation"] is None, 120,
                   message="the fuzzed operation to end")
        assert self.appd.proc.poll() is None, f"the daemon died:\n{self.appd.log()[-3000:]}"
        status = self.client.call("status")
        assert status["daemon"]["pid"] == self.appd.pid
        if status["target_workers"] != 1:
            self.client.call("scale", count=1)

    def reload_config(self, content: bytes) -> None:
        self.config.write_bytes(content)
        try:
            self.client.call("reload")
            self.counts["config:accepted"] += 1
            self.config.write_text(BASELINE)
            self.client.call("reload")  # undo a valid change before the next example
        except CommandError as exc:
            assert exc.code not in (protocol.UNREACHABLE, protocol.INTERNAL), exc
            self.counts[f"config:{exc.code}"] += 1
        finally:
            self.config.write_text(BASELINE)
        self.after_each()

    def command(self, cmd: str, args: dict) -> None:
        try:
            self.call_raw(cmd, args)
            self.counts[f"{cmd}:ok"] += 1
        except CommandError as exc:
            assert exc.code not in (protocol.UNREACHABLE, protocol.INTERNAL), (cmd, args, exc)
            self.counts[f"{cmd}:{exc.code}"] += 1
        self.after_each()

    def call_raw(self, cmd: str, args: dict) -> None:
        """Client.call, but with any args map (keys such as "cmd" or non-strings included)."""
        client = self.client.connect()
        request_id = next(client._ids)
        client._sock.sendall(protocol.encode({"v": protocol.VERSION, "id": request_id, "cmd": cmd, "args": args}))
        deadline = time.monotonic() + 120
        while True:
            message = client._next_message(deadline)
            if message.get("id") != request_id or "event" in message:
                continue
            if message.get("ok"):
                return
            error = message.get("error") or {}
            raise CommandError(error.get("code", protocol.FAILED), error.get("message", "failed"), error)


def run_faults(appd, config_path, count: int) -> dict:
    """`count` fuzzed config files and `count` fuzzed commands; returns the figures."""
    run = FaultRun(appd, config_path)
    fuzz = settings(max_examples=count, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
    started = time.monotonic()

    @fuzz
    @given(config_files())
    def fuzz_configs(content):
        run.reload_config(content)

    @fuzz
    @given(commands)
    def fuzz_commands(example):
        run.command(*example)

    with StatusProbe(appd.socket, interval=0.02) as probe:
        fuzz_configs()
        fuzz_commands()
    run.client.close()
    configs = sum(v for k, v in run.counts.items() if k.startswith("config:"))
    return {"configs": configs, "commands": sum(run.counts.values()) - configs, "counts": run.counts,
            "probe": probe, "seconds": time.monotonic() - started}


def print_faults(figures: dict) -> None:
    probe = figures["probe"]
    print(f"\nfault injection: {figures['configs']} fuzzed configs and {figures['commands']} fuzzed commands "
          f"in {figures['seconds']:.1f} s, daemon deaths 0; {probe.summary()}")
    print("  outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(figures["counts"].items())))
