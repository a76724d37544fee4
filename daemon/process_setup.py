"""A new master's process, set up before the app or any hook runs: raw_env,
pythonpath, umask, the app's stdlib logging (logconfig_dict), capture_output,
and last the user and group it runs as.

The daemon keeps its own identity (often root: it holds port 80, the control
socket and the pidfile); a generation and its workers run as `user`. Log
files the master already opened are handed to that user first, so reopen-logs
still works after the switch.
"""

from __future__ import annotations

import grp
import logging.config
import os
import pwd
import sys

from . import log


class SetupError(SystemExit):
    """The generation cannot run as configured; the message names the setting."""


def prepare(cfg) -> None:
    for pair in cfg.raw_env or []:
        name, _, value = pair.partition("=")
        os.environ[name] = value
    for directory in reversed((cfg.pythonpath or "").split(",")):
        if directory.strip():
            sys.path.insert(0, os.path.abspath(directory.strip()))
    if cfg.umask is not None:
        os.umask(cfg.umask)
    if cfg.logconfig_dict:
        _configure_stdlib_logging(cfg.logconfig_dict)
    if cfg.capture_output:
        capture_output(cfg.error_log or "-")
    if cfg.user or cfg.group:
        switch_user(cfg.user, cfg.group, bool(cfg.initgroups), cfg)


def _configure_stdlib_logging(config: dict) -> None:
    config = {"version": 1, "disable_existing_loggers": False, **config}
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        raise SetupError(f"appd: invalid logconfig_dict: {exc}") from None


def capture_output(error_log: str) -> None:
    """The app's print() and stray stderr go where the error log goes."""
    if error_log == "-":
        os.dup2(2, 1)  # both already reach the daemon's stderr; keep them in one stream
        return
    fd = os.open(error_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def resolve_ids(user: str | None, group: str | None) -> tuple[int, int, str | None]:
    """(uid, gid, user name); the group defaults to the user's primary group."""
    uid, gid, name = os.getuid(), os.getgid(), None
    if user:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, ValueError):
            raise SetupError(f"appd: user {user!r} does not exist") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise SetupError(f"appd: group {group!r} does not exist") from None
    return uid, gid, name


def switch_user(user: str | None, group: str | None, initgroups: bool, cfg) -> None:
    uid, gid, name = resolve_ids(user, group)
    if (uid, gid) == (os.getuid(), os.getgid()):
        return
    if os.geteuid() != 0:
        raise SetupError(f"appd: running as uid {os.geteuid()}, cannot switch to user {user!r} / "
                         f"group {group!r}; start appd as root or drop user/group")
    for path in (cfg.error_log, cfg.access_log):
        if path and path != "-":
            open(path, "a").close()  # workers open the access log after the switch
            os.chown(path, uid, gid)  # and reopen-logs keeps working as the new user
    if initgroups and name:
        os.initgroups(name, gid)
    else:
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    stdlib = os.path.dirname(os.__file__)
    if not os.access(stdlib, os.R_OK | os.X_OK):  # else: a puzzling ModuleNotFoundError later
        raise SetupError(f"appd: user {user or uid} cannot read Python's standard library at {stdlib}; "
                         "install the interpreter (and the venv) where that user can read it")
    log.get(role="master").info("running_as", uid=uid, gid=gid, groups=os.getgroups())
