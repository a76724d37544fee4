"""The reliability scenarios, sized by their callers: tests/chaos/ runs them
long (`make chaos`), tests/test_reliability.py short (`make test`). Each
returns its figures; the tests assert on them and print them."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appdctl import Client, CommandError

from chaos.tools import (FrameFuzzer, StatusProbe, census, half_written_frame, settled_usage, still_there,
                         temp_entries, unlinked_files, usage)
from conftest import wait_until
from loadgen import Load

TESTS = Path(__file__).resolve().parent.parent


def chaos_seed() -> int:
    """APPD_CHAOS_SEED replays a run; otherwise a fresh seed, always printed."""
    value = os.environ.get("APPD_CHAOS_SEED")
    return int(value) if value else random.randrange(2**31)


def generation_pids(status: dict) -> set[int]:
    pids = set()
    for generation in status["generations"]:
        pids.add(generation["master_pid"])
        pids.update(w["pid"] for w in generation["workers"])
    return pids


def steady(appd, target: int | None = None) -> dict | None:
    """The status when exactly one generation serves `target` ready workers and
    nothing else runs (no operation, no other generation); else None."""
    status = appd.status()
    target = status["target_workers"] if target is None else target
    generations = status["generations"]
    if (status["operation"] is None and status["daemon"]["state"] == "running" and len(generations) == 1
            and generations[0]["state"] == "serving" and generations[0]["ready_workers"] == target
            and len(generations[0]["workers"]) == target):
        return status
    return None


def tree_is_clean(appd, target: int) -> dict | None:
    """The census when the daemon's tree is exactly daemon + one master + `target`
    workers, no zombie, and no process of this daemon lives outside its tree."""
    found = census(appd.pid)
    if len(found["tree"]) == 2 + target and not found["zombies"] and not found["strays"]:
        return found
    return None


# --- leaks across upgrades ---

def upgrade_leaks(appd, upgrades: int, warmup: int = 3) -> dict:
    """Run `upgrades` upgrades; measure the daemon before and after, and find every
    process and file they might have left behind."""
    target = appd.status()["target_workers"]
    for _ in range(warmup):  # first-use allocations (imports, caches) are not leaks
        appd.call("upgrade")
    wait_until(lambda: steady(appd) and tree_is_clean(appd, target), 15, message="a steady tree before")
    before = settled_usage(appd.pid, usage(appd.pid), fd_slack=0, timeout=2)
    temp_before = temp_entries()
    first = appd.status()["generations"][0]["id"]
    seen: set[int] = set()
    started = time.monotonic()
    for n in range(1, upgrades + 1):
        result = appd.call("upgrade")
        assert result["generation"] == first + n, result
        seen |= generation_pids(appd.status())
    seconds = time.monotonic() - started
    status = wait_until(lambda: steady(appd), 15, message="one generation serving after the upgrades")
    clean = wait_until(lambda: tree_is_clean(appd, target), 15,
                       message=f"a clean process tree: {census(appd.pid)}")
    after = settled_usage(appd.pid, before, fd_slack=0)
    current = generation_pids(status)
    return {
        "upgrades": upgrades, "seconds": seconds, "before": before, "after": after,
        "census": clean, "leftover": still_there(seen - current), "seen": len(seen),
        "new_temp": sorted(temp_entries() - temp_before), "unlinked": unlinked_files(appd.pid),
    }


def print_leaks(figures: dict) -> None:
    before, after = figures["before"], figures["after"]
    print(f"\n{figures['upgrades']} upgrades in {figures['seconds']:.1f} s, {figures['seen']} masters "
          f"and workers started and stopped")
    print(f"  daemon before: {before.line()}")
    print(f"  daemon after:  {after.line()}  (rss {(after.rss - before.rss) / 2**10:+.0f} KiB)")
    print(f"  processes leaked: {len(figures['leftover'])}, zombies: {len(figures['census']['zombies'])}, "
          f"orphans: {len(figures['census']['orphans'])}, strays: {len(figures['census']['strays'])}, "
          f"new temp files: {len(figures['new_temp'])}, unlinked fds: {len(figures['unlinked'])}")


# --- control socket abuse ---

def control_abuse(appd, seed: int, frames: int, drops: int, connections: int = 4,
                  wait_half_frame_closed: bool = False) -> dict:
    """Abuse the control socket from another process while a probe times `status`
    and an operator scales +1 then -1."""
    status = wait_until(lambda: steady(appd), 15, message="a steady service before the abuse")
    target, generation = status["target_workers"], status["generations"][0]["id"]
    before = usage(appd.pid)
    half = half_written_frame(appd.socket)
    scaled = []
    with StatusProbe(appd.socket) as probe:
        wait_until(lambda: len(probe.latencies) >= 5, 10, message="the status probe to flow")
        abuse = subprocess.Popen(
            [sys.executable, "-m", "chaos.abuse", "--socket", appd.socket, "--seed", str(seed),
             "--frames", str(frames), "--drops", str(drops), "--connections", str(connections)],
            cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert abuse.stdout.readline().strip() == "started", abuse.stderr.read()
            for delta in (1, -1):
                with Client(appd.socket, timeout=60) as client:
                    began = time.monotonic()
                    result = client.call("scale", delta=delta)
                    scaled.append({"delta": delta, "result": result, "seconds": time.monotonic() - began,
                                   "during_abuse": abuse.poll() is None,
                                   "ready": appd.serving_generation()["ready_workers"]})
            out, err = abuse.communicate(timeout=120)
        finally:
            if abuse.poll() is None:
                abuse.kill()
                abuse.wait()
        assert abuse.returncode == 0, err
        half_closed = None
        if wait_half_frame_closed:
            half.settimeout(15)
            try:
                half_closed = half.recv(1) == b""
            except ConnectionResetError:
                half_closed = True
    half.close()
    stats = json.loads(out)
    final = wait_until(lambda: steady(appd), 15, message="a steady service after the abuse")
    after = settled_usage(appd.pid, before, fd_slack=0)
    return {"seed": seed, "stats": stats, "probe": probe, "scaled": scaled, "target": target,
            "generation": generation, "final": final, "before": before, "after": after,
            "half_closed": half_closed}


def unexpected(stats: dict) -> dict:
    """What the abuse client saw that the protocol does not allow (missing or
    wrong replies, a hang-up on a well-framed request, silence)."""
    return {k: v for k, v in stats.items() if k.startswith(("UNEXPECTED", "send_failed"))}


def print_abuse(figures: dict) -> None:
    stats = figures["stats"]
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped:"))
    sent = sum(v for k, v in stats.items() if k.startswith("frame:"))
    print(f"\ncontrol socket abuse (seed {figures['seed']}) in {stats['seconds']} s: "
          f"{dropped} connections opened and dropped, {sent} fuzzed frames")
    print("  frames:  " + ", ".join(f"{k[6:]} {v}" for k, v in stats.items() if k.startswith("frame:")))
    print("  replies: " + ", ".join(f"{k[6:]} {v}" for k, v in stats.items() if k.startswith("reply:")))
    print(f"  hung up by the daemon on bad framing: {stats.get('closed_by_daemon', 0)} "
          f"({stats.get('parting_error', 0)} after a parting bad_request), "
          f"connect failures: {sum(v for k, v in stats.items() if k.startswith('connect_failed'))}, "
          f"unexpected answers: {unexpected(stats) or 0}")
    print(f"  {figures['probe'].summary()}")
    for op in figures["scaled"]:
        print(f"  scale {op['delta']:+d} -> target {op['result'].get('target')} in {op['seconds']:.3f} s "
              f"({'during' if op['during_abuse'] else 'after'} the abuse)")
    print(f"  daemon before: {figures['before'].line()}; after: {figures['after'].line()}")


# --- the soak: load + random faults + random operations ---

@dataclass
class Fault:
    kind: str
    at: float          # time.monotonic() just after the signal
    pid: int
    budget: int        # requests that may fail because of it (in flight on what it killed)
    window: float      # failures it causes end within this many seconds
    attributed: list = field(default_factory=list)


@dataclass
class Operation:
    kind: str
    args: dict
    started: float
    ended: float = 0.0
    outcome: str = ""
    error: str = ""


FAULT_WEIGHTS = {"kill_worker": 4, "stop_worker": 2, "kill_master": 1, "garbage": 3}
OPERATION_WEIGHTS = {"upgrade": 3, "reload": 2, "scale": 3, "retire": 2}
HARMFUL = ("kill_worker", "stop_worker", "kill_master")


class Soak:
    """Drives faults (this thread) and operations (an operator thread) at random,
    both from one seed, while a Load runs; then accounts for every request."""

    def __init__(self, appd, seed: int, seconds: float, timeout: float, graceful_timeout: float,
                 min_workers: int = 2, max_workers: int = 4):
        self.appd = appd
        self.seed = seed
        self.seconds = seconds
        self.timeout = timeout
        self.graceful_timeout = graceful_timeout
        self.min_workers, self.max_workers = min_workers, max_workers
        self.faults: list[Fault] = []
        self.operations: list[Operation] = []
        self.skipped: collections.Counter = collections.Counter()
        self.seen: set[int] = set()
        self._stop = threading.Event()

    # --- driving ---

    def run(self, load: Load) -> None:
        operator = threading.Thread(target=self._operate, name="operator", daemon=True)
        operator.start()
        rng = random.Random(self.seed)
        end = time.monotonic() + self.seconds
        try:
            while time.monotonic() < end:
                kind = rng.choices(list(FAULT_WEIGHTS), list(FAULT_WEIGHTS.values()))[0]
                getattr(self, kind)(rng)
                self._stop.wait(rng.uniform(0.4, 1.6))
        finally:
            self._stop.set()
            operator.join(120)
        assert not operator.is_alive(), "the operator thread is stuck in an operation"

    def _status(self) -> dict:
        status = self.appd.status()
        self.seen |= generation_pids(status)
        return status

    def _serving(self) -> dict | None:
        serving = [g for g in self._status()["generations"] if g["state"] == "serving"]
        return serving[-1] if serving else None

    def _signal(self, kind: str, pid: int, signum: int, budget: int, window: float) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            self.skipped[f"{kind}: target gone"] += 1
            return
        self.faults.append(Fault(kind, time.monotonic(), pid, budget, window))

    def _ready_worker(self, rng, exclude=()) -> int | None:
        generation = self._serving()
        if generation is None:
            return None
        ready = [w["pid"] for w in generation["workers"] if w["state"] == "ready" and w["pid"] not in exclude]
        return rng.choice(ready) if ready else None

    def kill_worker(self, rng) -> None:
        pid = self._ready_worker(rng, exclude=self._stopped())
        if pid is None:
            self.skipped["kill_worker: no ready worker"] += 1
            return
        # A sync worker serves one connection at a time: at most one request in flight.
        self._signal("kill_worker", pid, signal.SIGKILL, budget=1, window=1.0)

    def _stopped(self) -> set[int]:
        return {f.pid for f in self.faults if f.kind == "stop_worker" and still_there([f.pid])}

    def stop_worker(self, rng) -> None:
        if self._stopped():  # one hung worker at a time
            self.skipped["stop_worker: one is already hung"] += 1
            return
        pid = self._ready_worker(rng)
        if pid is None:
            self.skipped["stop_worker: no ready worker"] += 1
            return
        # The master sees no heartbeat for `timeout`, sends SIGABRT, then SIGKILL 2 s later;
        # the request it held (if any) fails then. If an upgrade drains the generation
        # first, a stopping worker is bounded by graceful_timeout from the drain instead.
        self._signal("stop_worker", pid, signal.SIGSTOP, budget=1,
                     window=self.timeout + self.graceful_timeout + 2.0)

    def kill_master(self, rng) -> None:
        status = self._status()
        serving = [g for g in status["generations"] if g["state"] == "serving"]
        if not serving:
            self.skipped["kill_master: none serving"] += 1
            return
        generation = serving[-1]
        # Keep the crash backoff short (it doubles per crash of a generation younger than
        # 10 s): requests wait in the backlog meanwhile, and must not time out.
        if len(status["crashes"]) >= 2 and time.time() - generation["started_at"] < 12:
            self.skipped["kill_master: would crash-loop"] += 1
            return
        # Its workers get SIGTERM and finish what they hold; at most one request each.
        self._signal("kill_master", generation["master_pid"], signal.SIGKILL,
                     budget=len(generation["workers"]), window=self.graceful_timeout + 3.0)

    def garbage(self, rng) -> None:
        fuzzer = FrameFuzzer(rng.randrange(2**31))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(self.appd.socket)
            for _ in range(rng.randint(1, 20)):
                sock.sendall(fuzzer.frame().data)
        except OSError:
            pass  # the daemon hung up on a bad frame: what it should do
        finally:
            sock.close()
        self.faults.append(Fault("garbage", time.monotonic(), 0, budget=0, window=0.0))
        self.appd.call("ping")

    def _operate(self) -> None:
        rng = random.Random(self.seed + 1)
        while not self._stop.is_set():
            kind = rng.choices(list(OPERATION_WEIGHTS), list(OPERATION_WEIGHTS.values()))[0]
            args: dict = {}
            try:
                if kind == "scale":
                    target = self._status()["target_workers"]
                    up = target < self.max_workers and (target <= self.min_workers or rng.random() < 0.5)
                    args = {"delta": 1 if up else -1}
                elif kind == "retire":
                    pid = self._ready_worker(rng, exclude=self._stopped())
                    if pid is None:
                        self.skipped["retire: no ready worker"] += 1
                        continue
                    args = {"pid": pid}
                op = Operation(kind, args, time.monotonic())
                self.operations.append(op)
                try:
                    with Client(self.appd.socket, timeout=90) as client:
                        client.call(kind, **args)
                    op.outcome = "ok"
                except CommandError as exc:
                    op.outcome, op.error = exc.code, exc.message
                op.ended = time.monotonic()
            except Exception as exc:  # never die silently: the accounting shows it
                self.operations.append(Operation(kind, args, time.monotonic(), time.monotonic(),
                                                 "test_error", repr(exc)))
            self._stop.wait(rng.uniform(0.2, 1.2))

    # --- accounting ---

    def account(self, load: Load) -> dict:
        """Attribute every failed request to a fault that could have caused it:
        one that killed a process while the request was in flight, within that
        fault's budget. Operations may fail only when a harmful fault overlapped."""
        results = load.snapshot()
        failures = sorted((r for r in results if not r.ok), key=lambda r: r.started + r.latency)
        unexplained = []
        for failure in failures:
            end = failure.started + failure.latency
            candidates = [f for f in self.faults if f.kind in HARMFUL and len(f.attributed) < f.budget
                          and failure.started <= f.at and f.at <= end + 0.05 and end <= f.at + f.window]
            if candidates:
                max(candidates, key=lambda f: f.at).attributed.append(failure)
            else:
                unexplained.append(failure)
        failed_ops = [op for op in self.operations if op.outcome != "ok"]
        # A fault's effects last its window: a master killed just before a reload began still fails it.
        unexplained_ops = [op for op in failed_ops if op.outcome == "test_error" or not any(
            f.kind in HARMFUL and op.started - f.window <= f.at <= op.ended for f in self.faults)]
        return {"results": results, "failures": failures, "unexplained": unexplained,
                "failed_ops": failed_ops, "unexplained_ops": unexplained_ops}

    def report(self, load: Load, accounting: dict) -> str:
        results, failures = accounting["results"], accounting["failures"]
        ok = len(results) - len(failures)
        elapsed = max(load.stopped - load.started, 1e-9)
        lines = [f"soak (seed {self.seed}): {self.seconds:.0f} s of faults under {load.threads} load threads",
                 f"  requests sent {len(results)}, ok {ok}, failed {len(failures)}  "
                 f"({len(results) / elapsed:.0f} req/s, max latency {load.max_latency:.2f} s)"]
        why = collections.Counter()
        for fault in self.faults:
            for failure in fault.attributed:
                why[(fault.kind, _reason(failure))] += 1
        for failure in accounting["unexplained"]:
            why[("UNEXPLAINED", _reason(failure))] += 1
        for (kind, reason), count in sorted(why.items()):
            lines.append(f"    failed: {count:5d}  in flight on {kind}: {reason}")
        lines.append(f"  {'fault':<14}{'injected':>9}{'failed':>8}{'budget':>8}")
        for kind in FAULT_WEIGHTS:
            of_kind = [f for f in self.faults if f.kind == kind]
            lines.append(f"  {kind:<14}{len(of_kind):>9}{sum(len(f.attributed) for f in of_kind):>8}"
                         f"{sum(f.budget for f in of_kind):>8}")
        lines.append(f"  {'operation':<14}{'runs':>9}  outcomes")
        for kind in OPERATION_WEIGHTS:
            of_kind = [op for op in self.operations if op.kind == kind]
            outcomes = collections.Counter(op.outcome for op in of_kind)
            lines.append(f"  {kind:<14}{len(of_kind):>9}  " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
        for op in accounting["failed_ops"]:
            lines.append(f"    {op.kind} {op.args or ''} -> {op.outcome}: {op.error[:160]}")
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        return "\n".join(lines)


def _reason(result) -> str:
    if result.error:
        return result.error.split("(", 1)[0]
    return f"HTTP {result.status}"


def soak(appd, seed: int, seconds: float, timeout: float, graceful_timeout: float, threads: int = 4) -> dict:
    """The whole soak: load, chaos, then settle and take the census."""
    driver = Soak(appd, seed, seconds, timeout, graceful_timeout)
    before = usage(appd.pid)
    with Load(appd.address, threads=threads, max_seconds=seconds + 180, request_timeout=20) as load:
        driver.run(load)
        # Back to a steady service before the load stops: hung workers killed,
        # crashed masters replaced, stragglers gone.
        settled = wait_until(lambda: steady(appd), timeout + graceful_timeout + 30,
                             message="the service to settle after the chaos")
        load.wait_for(20)
    target = settled["target_workers"]
    clean = wait_until(lambda: tree_is_clean(appd, target), graceful_timeout + 10,
                       message=f"a clean process tree after the chaos: {census(appd.pid)}")
    driver.seen |= generation_pids(appd.status())
    current = generation_pids(appd.status())
    after = settled_usage(appd.pid, before)
    accounting = driver.account(load)
    leftover = still_there(driver.seen - current)
    report = driver.report(load, accounting) + (
        f"\n  daemon before: {before.line()}; after: {after.line()}"
        f"\n  processes leaked: {len(leftover)}, zombies: {len(clean['zombies'])}, strays: {len(clean['strays'])}")
    return {"driver": driver, "load": load, "accounting": accounting, "census": clean, "before": before,
            "after": after, "leftover": leftover, "report": report}
