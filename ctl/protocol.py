"""The control protocol, defined once: appdctl speaks it and the daemon imports it.

A frame is a 4-byte big-endian length followed by one msgpack map.

Request:   {"v": 1, "id": int, "cmd": str, "args": {...}}
Progress:  {"id": int, "event": str, ...}           (zero or more)
Final:     {"id": int, "ok": True, "result": {...}}
        or {"id": int, "ok": False, "error": {"code": str, "message": str, ...}}

This module must stay light: appdctl imports it on every run, so it imports
nothing but msgpack and the standard library.
"""

from __future__ import annotations

import os
import reprlib
import struct

import msgpack

VERSION = 1
MAX_FRAME = 1024 * 1024
_LENGTH = struct.Struct(">I")

# Error codes carried in a failed reply's error["code"].
BAD_REQUEST = "bad_request"
UNKNOWN_COMMAND = "unknown_command"
BUSY = "busy"
PERMISSION_DENIED = "permission_denied"
TIMEOUT = "timeout"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
INTERNAL = "internal"  # an unexpected exception in the daemon; it logged it and goes on serving
UNREACHABLE = "unreachable"  # client-side only: no daemon answered

# Exit codes of appdctl, one per error code (the contract's table).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_CODES = {
    BAD_REQUEST: EXIT_USAGE,
    UNKNOWN_COMMAND: EXIT_USAGE,
    BUSY: EXIT_REFUSED,
    PERMISSION_DENIED: EXIT_REFUSED,
    TIMEOUT: EXIT_FAILED,
    FAILED: EXIT_FAILED,
    ROLLED_BACK: EXIT_FAILED,
    INTERNAL: EXIT_FAILED,
    UNREACHABLE: EXIT_UNREACHABLE,
}


class Arg:
    """One argument of a command: its msgpack type and whether it is required."""

    def __init__(self, kind: type | tuple[type, ...], required: bool = False, default=None):
        self.kind = kind
        self.required = required
        self.default = default


# Every command, its arguments, and whether it changes the service
# (changing commands run one at a time; the others always answer).
COMMANDS: dict[str, tuple[bool, dict[str, Arg]]] = {
    "ping": (False, {}),
    "status": (False, {}),
    "reload": (True, {"wait": Arg(bool, default=True)}),
    "upgrade": (True, {"wait": Arg(bool, default=True), "env": Arg(dict, default=None),
                       "daemon": Arg(bool, default=False), "canary": Arg(int, default=None),
                       "hold": Arg(bool, default=False)}),
    "promote": (True, {}),
    "rollback": (True, {}),
    "scale": (True, {"delta": Arg(int), "count": Arg(int)}),
    "drain": (True, {"timeout": Arg((int, float), default=None)}),
    "stop": (True, {}),
    "reopen_logs": (False, {}),
    "retire": (True, {"pid": Arg(int, required=True)}),
}


_SHORT = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 6


def short(value) -> str:
    """A bounded repr for error messages: a request may nest 1,000 levels deep or
    carry 500k elements, and its error reply must still be small and cheap."""
    return _SHORT.repr(value)


class ProtocolError(Exception):
    """A frame or request that breaks the protocol. `code` is the error code to reply."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def encode(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(BAD_REQUEST, f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into messages. Raises ProtocolError on garbage framing.

    Used on both sides: the daemon's control server and its channels to masters,
    and the client.
    """

    def __init__(self, max_frame: int = MAX_FRAME):
        self.buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list:
        self.buffer += data
        messages = []
        while len(self.buffer) >= 4:
            (length,) = _LENGTH.unpack_from(self.buffer)
            if length > self.max_frame:
                raise ProtocolError(BAD_REQUEST, f"frame length {length} exceeds {self.max_frame}")
            if len(self.buffer) < 4 + length:
                break
            body = bytes(self.buffer[4:4 + length])
            del self.buffer[:4 + length]
            try:
                messages.append(msgpack.unpackb(body, raw=False, strict_map_key=False))
            except Exception as exc:
                raise ProtocolError(BAD_REQUEST, f"unparsable msgpack body: {exc}") from None
        return messages

    @property
    def partial(self) -> bool:
        """True while a frame has begun but not ended."""
        return bool(self.buffer)


def validate_request(message) -> tuple[int, str, dict]:
    """Check a decoded request against COMMANDS; return (id, cmd, args with defaults)."""
    if not isinstance(message, dict):
        raise ProtocolError(BAD_REQUEST, f"a request must be a map, not {type(message).__name__}")
    if message.get("v") != VERSION:
        raise ProtocolError(BAD_REQUEST, f"unsupported protocol version {short(message.get('v'))}, expected {VERSION}")
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(BAD_REQUEST, "request id must be an integer")
    cmd = message.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError(BAD_REQUEST, "cmd must be a string")
    name = cmd.replace("-", "_")  # "reopen-logs" as appdctl spells it, "reopen_logs" as the table does
    if name not in COMMANDS:
        raise ProtocolError(UNKNOWN_COMMAND, f"unknown command {short(cmd)}; known: {', '.join(sorted(COMMANDS))}")
    cmd = name
    args = message.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError(BAD_REQUEST, "args must be a map")
    spec = COMMANDS[cmd][1]
    unknown = set(args) - set(spec)
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"{cmd}: unknown argument(s) "
                            f"{', '.join(sorted(short(k) for k in list(unknown)[:8]))}")
    checked = {}
    for name, arg in spec.items():
        value = args.get(name)
        if value is None:
            if arg.required:
                raise ProtocolError(BAD_REQUEST, f"{cmd}: argument {name!r} is required")
            checked[name] = arg.default
            continue
        if not isinstance(value, arg.kind) or (isinstance(value, bool) and arg.kind is not bool):
            kinds = arg.kind if isinstance(arg.kind, tuple) else (arg.kind,)
            raise ProtocolError(BAD_REQUEST, f"{cmd}: argument {name!r} must be "
                                f"{' or '.join(k.__name__ for k in kinds)}, not {type(value).__name__}")
        checked[name] = value
    return request_id, cmd, checked


def error_reply(request_id, code: str, message: str, **extra) -> dict:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message, **extra}}


def ok_reply(request_id, result: dict | None = None) -> dict:
    return {"id": request_id, "ok": True, "result": result or {}}


def event(request_id, name: str, **fields) -> dict:
    return {"id": request_id, "event": name, **fields}


def default_socket_path(uid: int | None = None, environ=os.environ) -> str:
    """The control socket path both appd and appdctl use when none is given."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "appd.sock")
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return "/run/appd/appd.sock"
    return f"/tmp/appd-{uid}/appd.sock"
