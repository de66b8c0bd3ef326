"""A fault-injecting HTTP proxy for an S3 endpoint (the moto server of the test suite).

Clients are pointed at the proxy as their ``endpoint_url``; it forwards each request to the real
endpoint, except that a seeded fraction of them fail in one of the ways object stores really fail:

- ``500``: ``InternalError`` with the S3 XML error body, before the request reaches the store;
- ``503``: ``SlowDown`` (throttling) with the S3 XML error body, before the request reaches the store;
- ``reset``: the TCP connection is reset (SO_LINGER 0) without a response, before forwarding;
- ``truncated``: the request IS applied upstream, the response goes out with its full
  ``Content-Length`` but only part of the body, then the connection closes — a GET that returns a
  short object, or a PUT whose success the client never sees.

Why a proxy and not mocks: the retries under test live in three layers (botocore's retry handler,
s3fs's own wrapper, the flows' task retries) and only real sockets exercise all three as they run
in production. The fault sequence is seeded (one RNG draw per request, in arrival order), so a run
with the same request order injects the same faults.
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_KINDS = ("500", "503", "reset", "truncated")

_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
              '<RequestId>faultproxy</RequestId></Error>')
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


class FaultProxy:
    """``with FaultProxy(upstream, rate=0.05, seed=1) as proxy: ... proxy.url ... proxy.stats``.

    ``rate``: fraction of requests that fail; ``kinds``: which faults to draw from (uniformly).
    ``rate`` can be changed while running (``proxy.rate = 1.0``).
    """

    def __init__(self, upstream: str, rate: float = 0.05, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS):
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {FAULT_KINDS}")
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.rate, self.kinds = float(rate), tuple(kinds)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.stats: Counter = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- decisions ------------------------------------------------------------------------------
    def draw(self) -> str | None:
        """The fault for the next request (None = forward it untouched); counted in ``stats``."""
        with self._lock:
            self.stats["requests"] += 1
            fault = self._rng.choice(self.kinds) if self._rng.random() < self.rate else None
            self.stats[fault or "forwarded"] += 1
            if fault:
                self.stats["faults"] += 1
            return fault


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:  # keep test output clean
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP RST: "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _error(self, status: int, code: str, msg: str) -> None:
        body = _ERROR_XML.format(code=code, msg=msg).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS], data
        finally:
            conn.close()

    def _proxy(self) -> None:
        body = self._read_body()
        fault = self.owner.draw()
        if fault == "500":
            return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
        if fault == "503":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if fault == "reset" or (fault == "truncated" and self.command == "HEAD"):
            return self._reset()
        status, reason, headers, data = self._forward(body)
        self.send_response(status, reason)
        for k, v in headers:
            if k.lower() != "content-length":
                self.send_header(k, v)
        if self.command == "HEAD":
            length = next((v for k, v in headers if k.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        if fault == "truncated":
            self.send_header("Content-Length", str(max(len(data), 64)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy
