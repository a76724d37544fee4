"""What sits between a proxy and the app: TLS on the worker's side of a plain
listener, the PROXY protocol (v1 text, v2 binary) from proxy_allow_ips peers,
and X-Forwarded-* / forwarder headers believed from forwarded_allow_ips peers
only (gunicorn's settings and defaults).

Workers build one ConnectionSetup per listener (ServerInfo.setup); Connection
calls accept() once per accepted socket and the request layer calls
ProxyRules.apply() for each request that carries one of its headers.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import struct
import time

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the longest v1 line, CRLF included (the spec's number)
PROXY_HEADER_TIMEOUT = 5.0


class ProxyProtocolError(OSError):
    """A PROXY header was required and is missing or malformed: the connection is closed."""


# --- who is trusted ---

class Peers:
    """A list of addresses and networks (or *); unix-socket peers are local, hence trusted."""

    def __init__(self, specs: list[str]):
        self.everyone = "*" in specs
        self._seen: dict[str, bool] = {}
        self.networks = [ipaddress.ip_network(spec.strip(), strict=False)
                         for spec in specs if spec.strip() and spec.strip() != "*"]

    def __contains__(self, address: str) -> bool:
        if self.everyone or not address:
            return True
        known = self._seen.get(address)
        if known is None:
            known = self._seen[address] = self._match(address)
            if len(self._seen) > 4096:
                self._seen.clear()
        return known

    def _match(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


# --- per request: what a trusted proxy says about the client ---

class ProxyRules:
    def __init__(self, cfg):
        self.trusted = Peers(cfg.forwarded_allow_ips or [])
        self.secure = [("HTTP_" + name.upper().replace("-", "_"), value.lower())
                       for name, value in (cfg.secure_scheme_headers or {}).items()]
        self.forwarders = [name.upper() for name in cfg.forwarder_headers or []]
        # The headers that matter (environ keys): most requests carry none, and
        # then apply() is not called at all (wsgi._serve asks isdisjoint first).
        self.watched = frozenset({key for key, _ in self.secure} | {"HTTP_X_FORWARDED_FOR"}
                                 | {"HTTP_" + name for name in self.forwarders})

    def apply(self, environ: dict) -> None:
        """Rewrite REMOTE_ADDR, wsgi.url_scheme and the forwarder variables for a trusted
        peer; called for requests with at least one of the `watched` headers."""
        if environ.get("REMOTE_ADDR", "") not in self.trusted:
            return
        self._scheme(environ)
        self._client(environ)
        for name in self.forwarders:
            value = environ.get("HTTP_" + name)
            if value is not None:
                environ[name] = value
        script = environ.get("SCRIPT_NAME", "")
        if script and environ.get("PATH_INFO", "").startswith(script):
            environ["PATH_INFO"] = environ["PATH_INFO"][len(script):]

    def _scheme(self, environ: dict) -> None:
        said = [(environ[key].lower() == value) for key, value in self.secure if key in environ]
        if said:
            environ["wsgi.url_scheme"] = "https" if any(said) else "http"

    def _client(self, environ: dict) -> None:
        """X-Forwarded-For, read from the right: the first hop we do not trust is the client."""
        chain = [hop.strip() for hop in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
        if not chain:
            return
        client = chain[0]
        for hop in reversed(chain):
            if hop not in self.trusted:
                client = hop
                break
        environ["REMOTE_ADDR"] = client
        environ.pop("REMOTE_PORT", None)


# --- per connection: PROXY header, then TLS ---

class ConnectionSetup:
    def __init__(self, cfg, tls: ssl.SSLContext | None):
        self.mode = cfg.proxy_protocol or "off"
        self.proxy_peers = Peers(cfg.proxy_allow_ips or [])
        self.tls = tls
        self.rules = ProxyRules(cfg)

    @property
    def transferable(self) -> bool:
        """Whether a connection may move to another process (connection handoff) as
        bytes: not with a TLS session or a PROXY header's source, which stay here."""
        return self.mode == "off" and self.tls is None

    @property
    def blocking(self) -> bool:
        """Whether it must run in a thread: reading a PROXY header or a TLS handshake."""
        return self.mode != "off" or self.tls is not None

    def prepare(self, connection) -> bool:
        """Once per connection, before its first request: read the PROXY header (from an
        allowed peer), start TLS. False when the connection had to be closed."""
        connection.setup = None
        env = connection.env
        try:
            if self.mode != "off" and env.get("REMOTE_ADDR", "") in self.proxy_peers:
                source = read_proxy_header(connection.sock, self.mode)
                if source is not None:
                    env["REMOTE_ADDR"], env["REMOTE_PORT"] = source[0], str(source[1])
            if self.tls is not None:
                # The handshake happens on the first read, bounded by the socket's timeout.
                connection.sock = self.tls.wrap_socket(connection.sock, server_side=True,
                                                       do_handshake_on_connect=False)
                connection.reader.sock = connection.sock
                env["wsgi.url_scheme"] = "https"
        except (OSError, ValueError):
            connection.close()
            return False
        env["appd.proxy"] = self.rules
        return True


def read_proxy_header(sock: socket.socket, mode: str) -> tuple | None:
    """Consume a PROXY header; the source address it names, or None (LOCAL, UNKNOWN, or
    no header in auto mode). v1 or v2 mode requires one."""
    previous = sock.gettimeout()
    sock.settimeout(PROXY_HEADER_TIMEOUT)
    try:
        start = _peek_start(sock)
        if mode in ("v2", "auto") and start.startswith(V2_SIGNATURE):
            return _read_v2(sock)
        if mode in ("v1", "auto") and start.startswith(b"PROXY "):
            return _read_v1(sock)
        if mode == "auto":
            return None
        raise ProxyProtocolError(f"expected a PROXY protocol {mode} header")
    finally:
        sock.settimeout(previous)


def _peek_start(sock: socket.socket) -> bytes:
    """The first 16 bytes, or fewer once they cannot begin a PROXY header (e.g. a TLS hello)."""
    deadline = time.monotonic() + PROXY_HEADER_TIMEOUT
    while True:
        start = sock.recv(16, socket.MSG_PEEK)
        maybe = V2_SIGNATURE.startswith(start[:12]) or b"PROXY ".startswith(start[:6])
        if not start or len(start) >= 16 or not maybe:
            return start
        if time.monotonic() > deadline:
            raise ProxyProtocolError("PROXY header cut short")
        time.sleep(0.002)  # the rest of a header split across packets is on its way


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProxyProtocolError("connection closed inside the PROXY header")
        data += chunk
    return data


def _read_v1(sock: socket.socket) -> tuple | None:
    peek = sock.recv(_V1_MAX, socket.MSG_PEEK)
    end = peek.find(b"\r\n")
    if end < 0:
        raise ProxyProtocolError("PROXY v1 header longer than 107 bytes or cut short")
    parts = _recv_exactly(sock, end + 2)[:-2].decode("ascii", "replace").split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        return None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 header {' '.join(parts)[:80]!r}")
    try:
        ipaddress.ip_address(parts[2])
        return parts[2], int(parts[4])
    except ValueError:
        raise ProxyProtocolError(f"malformed PROXY v1 address {parts[2]!r}") from None


def _read_v2(sock: socket.socket) -> tuple | None:
    head = _recv_exactly(sock, 16)
    version_command, family, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
    body = _recv_exactly(sock, length)
    if version_command >> 4 != 2:
        raise ProxyProtocolError("PROXY v2 header with a wrong version")
    if version_command & 0x0F == 0:  # LOCAL: the proxy's own health check
        return None
    if family >> 4 == 1 and length >= 12:
        return socket.inet_ntop(socket.AF_INET, body[:4]), struct.unpack("!H", body[8:10])[0]
    if family >> 4 == 2 and length >= 36:
        return socket.inet_ntop(socket.AF_INET6, body[:16]), struct.unpack("!H", body[32:34])[0]
    return None  # AF_UNIX or UNSPEC: keep the peer address


# --- TLS ---

def tls_context(cfg) -> ssl.SSLContext | None:
    """The worker's server context, or None without certfile. Built at worker boot, so a
    reload (new workers) picks up a renewed certificate."""
    if not cfg.certfile:
        return None
    return _tls_context(cfg.certfile, cfg.keyfile, cfg.ca_certs,
                        cfg.cert_reqs or 0, cfg.ciphers)


@functools.lru_cache(maxsize=4)
def _tls_context(certfile, keyfile, ca_certs, cert_reqs, ciphers) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if ca_certs:
        context.load_verify_locations(ca_certs)
    context.verify_mode = ssl.VerifyMode(cert_reqs)
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def connection_setup(listener, cfg) -> ConnectionSetup:
    """What one listener's connections go through; TLS only on TCP listeners."""
    is_tcp = listener.sock.family in (socket.AF_INET, socket.AF_INET6)
    return ConnectionSetup(cfg, tls_context(cfg) if is_tcp else None)
