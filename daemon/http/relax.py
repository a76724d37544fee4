"""Where llhttp stops parsing: an upgrade (served as plain HTTP, nothing parsed
after it), a refusal (answered once the requests before it are served), or a
request line refused only for being stricter than the RFC (an extension
method, raw UTF-8 in the target, HTTP/1.2): then RequestReader waits for the
whole line, checks it (validate.relax_request_line) and parses it again."""

from __future__ import annotations

import httptools

from .errors import BadRequest, HTTPError, URITooLong
from .validate import relax_request_line


class RelaxedLine:
    """RequestReader's part for a parse that stops (see its state in
    RequestReader.__init__: done, error, head_chunks, heads_begun, pending_line, relaxed)."""

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_stopped(exc)

    def _parse_stopped(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):
            # Upgrade/CONNECT: WSGI cannot hand over the socket, so serve the
            # request as plain HTTP and parse nothing after it.
            self.done = True
            req = self.current
            if req is not None:
                req.keep_alive = False
                req.complete = True
        elif isinstance(exc, (httptools.HttpParserInvalidMethodError,
                              httptools.HttpParserInvalidURLError)):
            if not self._relax(isinstance(exc, httptools.HttpParserInvalidURLError)):
                self._stop(BadRequest(str(exc)))
        elif str(exc) == "Invalid HTTP version" and self.refusal is None:
            # llhttp's reason for 1.2 (served as 1.1) as for 3.0 (answered 505).
            if not self._relax(True):
                self._stop(BadRequest(str(exc)))
        else:
            self._stop(self.refusal or BadRequest(str(exc)))

    def _stop(self, error: HTTPError) -> None:
        """Parsing ends here: requests queued before this one are still served."""
        self.done = True
        self.error = error
        req = self.current
        if req is not None and not req.complete and self.ready and self.ready[-1] is req:
            self.ready.pop()  # its body or trailers are bad: answer the error, not the app
        elif req is not None and not self.in_head and not req.complete:
            req.broken = True

    def _relax(self, url_refused: bool) -> bool:
        """llhttp refused the method or the target of the head being read; if that
        head began at a known place, wait for its request line and parse it again
        relaxed (validate.relax_request_line). False: answer 400."""
        if self.head_chunks is None or self.heads_begun != 1 or self.relaxed is not None:
            return False  # e.g. the second of two pipelined requests in one recv
        self.keep_method = url_refused
        data = b"".join(self.head_chunks).lstrip(b"\r\n")
        self.head_chunks = None
        self.pending_line = b""
        self._relax_pending(data)
        return True

    def _relax_pending(self, data: bytes) -> None:
        line = self.pending_line + data
        end = line.find(b"\n")
        if end < 0:
            if self.limit_line and len(line) > self.limit_line + 2:
                self._stop(URITooLong("request line too long"))
            self.pending_line = line
            return
        self.pending_line = None
        if line[end - 1:end] != b"\r":
            self._stop(BadRequest("request line not ended by CRLF"))
            return
        try:
            head, method, target = relax_request_line(line[:end - 1], self.keep_method)
        except HTTPError as exc:
            self._stop(exc)
            return
        self.relaxed = (method, target)
        self.parser = httptools.HttpRequestParser(self)
        self.head_chunks = None
        self._feed(head + line[end - 1:])
