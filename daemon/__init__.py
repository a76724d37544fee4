"""appd: zero-downtime upgrade daemon for prefork web services."""

__version__ = "0.1.0"
