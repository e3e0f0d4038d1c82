"""kube-proxy's healthz stand-in: ``GET /healthz`` on :10256 of a node, as kube-proxy answers it.

Run inside a node namespace (not the pod's: kube-proxy runs on the host network and is not the
pod) with the host's stdlib-only python3:
``kube_proxy_healthz.py <port> <lab id> <stale flag file>``.
While the flag file is absent the proxy is fresh: 200 and a small JSON body whose lastUpdated is
now. While it exists the proxy's rules are stale (a sync overdue): 503, lastUpdated frozen at the
flag's time. Only kube-proxy's freshness: it says nothing about whether the VIP works on the node.
Prints ``ready`` once listening, then keeps quiet.
"""

import json
import os
import sys
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # see node_server.py


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")


def main() -> None:
    port, flag = int(sys.argv[1]), sys.argv[3]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            if self.path.split("?")[0] != "/healthz":
                self._reply(404, b"404 page not found\n", "text/plain; charset=utf-8")
                return
            now = datetime.now(UTC).timestamp()
            try:
                stale_since = os.stat(flag).st_mtime
            except FileNotFoundError:
                stale_since = None
            fresh = stale_since is None
            body = {
                "lastUpdated": _stamp(now if fresh else stale_since),
                "currentTime": _stamp(now),
                "nodeHealthy": fresh,
            }
            self._reply(200 if fresh else 503, json.dumps(body).encode(), "application/json")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = Server(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    server.serve_forever()


if __name__ == "__main__":
    main()
