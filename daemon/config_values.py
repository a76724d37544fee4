"""The kinds of value a setting can take: each parser takes a TOML value or a
string (environment, flag) and returns the typed value, or raises ValueError
with a message naming the bad value. config.SETTINGS names one per setting."""

from __future__ import annotations

import math
from typing import Callable

_INT_MAX = 2 ** 31 - 1      # every integer setting ends up in a C int somewhere (listen, setrlimit)
_SECONDS_MAX = 10.0 ** 9    # ~31 years: beyond this a timeout overflows C timevals


def _int(minimum: int | None = None, maximum: int | None = _INT_MAX) -> Callable:
    def parse(value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{value!r} is not an integer")
        try:
            number = int(value)
        except ValueError:  # also Python's limit on digits in a string
            raise ValueError(f"{_short(value)} is not an integer") from None
        if minimum is not None and number < minimum:
            raise ValueError(f"{number} is below the minimum {minimum}")
        if maximum is not None and number > maximum:
            raise ValueError(f"{number} is above the maximum {maximum}")
        return number
    parse.__name__ = "integer"
    return parse


def _short(value) -> str:
    from appdctl.protocol import short
    return short(value)


def seconds(value):
    """A duration: finite, not negative, not absurd. Shared with control arguments (drain --timeout)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{_short(value)} is not a number of seconds") from None
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{_short(value)} is not a finite number of seconds")
    if number < 0:
        raise ValueError(f"{number} is negative")
    if number > _SECONDS_MAX:
        raise ValueError(f"{_short(value)} is above the maximum {_SECONDS_MAX:.0f} seconds")
    return number


_seconds = seconds


def _bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{_short(value)} is not a boolean (use true or false)")


def _str(value):
    if not isinstance(value, str):
        raise ValueError(f"{_short(value)} is not a string")
    if "\0" in value:
        raise ValueError(f"{_short(value)} contains a NUL character")
    return value


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def _size(value):
    """Bytes, as an integer or with a K/M/G suffix (powers of 1024): 0 means no limit."""
    text = str(value).strip().upper() if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    unit = text[-1:] if text and text[-1:] in _SIZE_UNITS else ""
    try:
        number = int(text[:len(text) - len(unit)]) if text else None
    except ValueError:
        number = None
    if number is None or number < 0:
        raise ValueError(f"{_short(value)} is not a size in bytes (e.g. 512M, 1G, 1048576)")
    return number * _SIZE_UNITS[unit]

def _ratio(value) -> float:
    """A fraction between 0 and 1 (settings)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a ratio")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a ratio between 0 and 1") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{number} is not between 0 and 1")
    return number



def _optional_str(value):
    if value is None or value == "":
        return None
    return _str(value)


def _choice(*choices: str) -> Callable:
    def parse(value):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{_short(value)} is not one of {', '.join(choices)}")
        return value
    return parse


def _str_list(value):
    """A list from TOML, or a comma-separated string from the environment."""
    if isinstance(value, str):
        return [_str(part.strip()) for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_str(v) for v in value]
    raise ValueError(f"{_short(value)} is not a list of strings")


def _argv(value):
    """A command line: a TOML list, or a shell-quoted string."""
    if isinstance(value, str):
        import shlex
        return shlex.split(value)
    return _str_list(value)


def _int_list(value):
    try:
        return [int(v) for v in _str_list(value)] if isinstance(value, str) else [
            _int()(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{_short(value)} is not a list of integers") from None


def _mode(value):
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        try:
            number = int(str(value), 8)
        except ValueError:
            raise ValueError(f"{_short(value)} is not an octal file mode such as 0600") from None
    if not 0 <= number <= 0o777:
        raise ValueError(f"{_short(value)} is not a file mode between 0000 and 0777")
    return number


def _hook(value):
    value = _optional_str(value)
    if value is not None and ":" not in value:
        raise ValueError(f"{_short(value)} is not of the form module:function")
    return value


def _str_map(value):
    """A TOML table of strings, or `NAME=VALUE,NAME=VALUE` from a flag or the environment."""
    if isinstance(value, str):
        pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{value!r} is not a list of NAME=VALUE pairs")
        value = {name.strip(): text.strip() for name, text in pairs}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{value!r} is not a table of strings")
    return {str(k): v for k, v in value.items()}


def _json_table(value):
    """A TOML table, or the same as JSON text from a flag or the environment."""
    if isinstance(value, str):
        import json
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is not a table")
    return value


def _env_list(value):
    """NAME=VALUE strings (gunicorn's raw_env)."""
    pairs = _str_list(value) if isinstance(value, str) else _str_list(list(value))
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0]:
            raise ValueError(f"{pair!r} is not of the form NAME=VALUE")
    return pairs


def _umask(value):
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = int(value, 0) if value.lower().startswith("0o") else int(value, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal umask such as 0o022") from None
    return _mode(value)


def _cert_reqs(value):
    names = {"none": 0, "optional": 1, "required": 2}
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    return _int(0, 2)(value)


def _proxy_protocol(value):
    """off, v1, v2 or auto; gunicorn's older true/false mean auto/off."""
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return "auto" if _bool(value) else "off"
    return _choice("off", "v1", "v2", "auto")(value)


def _optional_host_port(value):
    """HOST:PORT or [V6]:PORT, or None (off)."""
    if value in (None, ""):
        return None
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return str(value)


def _bind(value):
    from .listeners import parse_address
    addresses = _str_list(value)
    if not addresses:
        raise ValueError("at least one address is needed")
    for address in addresses:
        parse_address(address)  # raises ValueError naming the address
    return addresses
