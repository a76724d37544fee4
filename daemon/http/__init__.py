"""HTTP/1.x request/response layer for the WSGI workers.

Workers build one ServerInfo per listener and call handle_connection() for
every accepted connection; everything else here is internal.
"""

from .. import speedups

# The compiled modules (when built and current) shadow the sources of the same
# names; IMPL says which run. See appd/speedups.py.
_compiled, IMPL_REASON = speedups.choose()
if _compiled:
    __path__.insert(0, _compiled)
IMPL = "compiled" if _compiled else "python"

from .wsgi import Connection, FileWrapper, ServerInfo, handle_connection  # noqa: E402

__all__ = ["Connection", "FileWrapper", "IMPL", "ServerInfo", "handle_connection"]
