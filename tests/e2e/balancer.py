"""A round-robin HTTP load balancer on loopback, standing in for the one in front of a
fleet of web machines: each request goes to the next backend, whatever connection it
came on, with its raw body and every header (``Set-Cookie`` included) passed through."""

from __future__ import annotations

import http.client
import itertools
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length",
               "proxy-connection", "upgrade"}


class RoundRobinBalancer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, backends: list[tuple[str, int]]):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.backends = backends
        self.served: Counter[int] = Counter()
        self._turn = itertools.cycle(range(len(backends)))
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_backend(self) -> tuple[int, tuple[str, int]]:
        with self._lock:
            index = next(self._turn)
            self.served[index] += 1
        return index, self.backends[index]

    def __enter__(self) -> RoundRobinBalancer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    server: RoundRobinBalancer

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        _index, (host, port) = self.server.next_backend()
        upstream = http.client.HTTPConnection(host, port, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.putheader("X-Forwarded-For", self.client_address[0])
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
        except OSError:
            self.send_error(502)
            return
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, *args) -> None:  # the backends keep the access logs
        pass
