"""A threaded HTTP server on 127.0.0.1 for the tests' fake endpoints (caption API, weight files)."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalServer:
    """Serves ``handler`` on a free port of 127.0.0.1 in a daemon thread; ``url`` ends with ``path``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], path: str = ""):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
