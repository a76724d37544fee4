"""HTTP/1.x request/response layer for the WSGI workers.

Workers build one ServerInfo per listener and call handle_connection() for
every accepted connection; everything else here is internal.
"""

from .wsgi import Connection, FileWrapper, ServerInfo, handle_connection

__all__ = ["Connection", "FileWrapper", "ServerInfo", "handle_connection"]
