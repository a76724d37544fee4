"""appdctl: the operator's client for appd, and its Python API."""

from .client import Client, CommandError

__all__ = ["Client", "CommandError"]
