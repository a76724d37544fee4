"""The daemon's inventory of listening sockets, after tableflip's `Fds`: it
opens them (binding, or taking systemd's), reuses them across reloads, carries
them across a daemon re-exec, tells a new generation about them, and is the
only place that closes one (unlinking a unix socket file appd bound itself).

Listeners are never closed during a reload or upgrade that keeps them: a
change of bind opens the new ones beside the old (a ListenerChange), and only
once the generation serving them is ready are the unused old ones closed.
"""

from __future__ import annotations

import os
import socket

from . import listeners as listeners_mod
from .listeners import Listener


def bind_explicit(cfg) -> bool:
    return cfg.sources.get("bind", "default") != "default"


class ListenerSet:
    def __init__(self, listeners: list[Listener], log):
        self.listeners = list(listeners)
        self.log = log

    # --- where they come from ---

    @classmethod
    def open_initial(cls, cfg, log, environ=os.environ) -> "ListenerSet":
        """A fresh start: systemd's sockets (LISTEN_FDS) and/or bound ones for `bind`."""
        inherited = listeners_mod.from_systemd(environ)
        return cls(listeners_mod.initial_listeners(cfg.bind, bind_explicit(cfg), cfg.backlog, inherited,
                                                   unix_mode=cfg.unix_socket_mode), log)

    @classmethod
    def adopt(cls, entries: list[dict], log) -> "ListenerSet":
        """The listeners a previous daemon image left open (re-exec in place)."""
        # "owned" is absent from states of images older than it: then unix listeners were ours
        return cls([Listener(e["name"], _adopt_socket(e["fd"]), e["spec"],
                             e.get("owned", e["spec"].startswith("unix:"))) for e in entries], log)

    def export_state(self) -> list[dict]:
        return [{"fd": l.fd, "name": l.name, "spec": l.spec, "owned": l.owned} for l in self.listeners]

    # --- what others see ---

    def __iter__(self):
        return iter(self.listeners)

    def __len__(self) -> int:
        return len(self.listeners)

    def fds(self) -> list[int]:
        return [l.fd for l in self.listeners]

    def addresses(self) -> list[str]:
        return [l.address for l in self.listeners]

    def describe(self) -> list[dict]:
        return [l.describe() for l in self.listeners]

    def generation_env(self) -> dict[str, str]:
        """APPD_FDS / APPD_FD_NAMES for a new generation."""
        return listeners_mod.generation_env(self.listeners)

    def specs_for(self, cfg) -> list[str]:
        """The listener specs `cfg` asks for. Without an explicit bind, socket-activated
        listeners (fd://N) stay what we serve across reloads."""
        activated = [l.spec for l in self.listeners if l.spec.startswith("fd://")]
        return cfg.bind if bind_explicit(cfg) or not activated else activated

    def differ(self, new_cfg, old_cfg) -> bool:
        """Whether going from `old_cfg` to `new_cfg` needs other listening sockets."""
        return self.specs_for(new_cfg) != self.specs_for(old_cfg) or new_cfg.backlog != old_cfg.backlog

    # --- changes ---

    def change(self, cfg) -> "ListenerChange":
        """Open what `cfg` asks for, reusing the listeners that match; from now on the
        set is the new one. OSError (nothing changed) when an address cannot be bound."""
        new = listeners_mod.open_listeners(self.specs_for(cfg), cfg.backlog, current=self.listeners,
                                           unix_mode=cfg.unix_socket_mode)
        change = ListenerChange(self, self.listeners, new)
        self.listeners = new
        return change

    def close_all(self) -> None:
        for listener in self.listeners:
            self.close(listener)

    def close(self, listener: Listener) -> None:
        try:
            listeners_mod.unlink_owned(listener)
        except OSError as exc:
            self.log.warning("listener_unlink_failed", listener=listener.spec, error=str(exc))
        listener.sock.close()


class ListenerChange:
    """New listeners opened beside the old ones: commit() closes the old ones no
    longer used, abort() closes the new ones and puts the old ones back."""

    def __init__(self, owner: ListenerSet, old: list[Listener], new: list[Listener]):
        self.owner, self.old, self.new = owner, old, new

    def commit(self) -> None:
        self._close_unused(self.old, keep=self.new)

    def abort(self) -> None:
        self._close_unused(self.new, keep=self.old)
        self.owner.listeners = self.old

    def _close_unused(self, candidates: list[Listener], keep: list[Listener]) -> None:
        keep_fds = {l.fd for l in keep}
        for listener in candidates:
            if listener.fd not in keep_fds:
                self.owner.close(listener)


def _adopt_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
