"""A small HTTP proxy on 127.0.0.1 in front of the moto server that misbehaves on purpose.

Of every ``period`` requests it answers one with ``503 SlowDown`` (S3's throttle answer) and
drops one by resetting the TCP connection (SO_LINGER 0), before forwarding anything, so the
store never sees those requests. The rest are forwarded unchanged. ``drop_all`` resets every
connection (an outage) until it is cleared. Counters say how many of
each happened, so tests can check that faults were really injected and retried.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], period: int = 10) -> None:
        self.upstream = upstream
        self.period = period
        self.enabled = True
        self.throttle_all = False  # answer every request with SlowDown
        self.drop_all = False  # reset every connection: the store is unreachable (an outage)
        self.count = self.throttled = self.reset = self.forwarded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.count += 1
                    slot = proxy.count % proxy.period if proxy.enabled else -1
                    if proxy.throttle_all:
                        slot = 1
                    if proxy.drop_all:
                        slot = 3
                if slot == 1:
                    with proxy.lock:
                        proxy.throttled += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if slot == 3:
                    with proxy.lock:
                        proxy.reset += 1
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                with proxy.lock:
                    proxy.forwarded += 1
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding",
                                            "connection", "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
