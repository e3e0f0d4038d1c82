"""A Kubernetes pod's backend stand-in: answers every GET with its node's name.

Run inside a pod namespace (tests/lab/nodes.py) with the host's stdlib-only python3:
``node_server.py <name> <port> <lab id> [<peers file>]`` (the id only marks the process as the
lab's). With a peers file, the peer address of every request is appended to it, one a line,
before the answer goes out: a test that has its answer can read who the pod saw. Prints
``ready`` once listening, then keeps quiet.

``GET /slow/<seconds>`` is a long download: CHUNK bytes every TICK s for that many seconds (at
most SLOW_MAX), Content-Length given up front, so a client sees a cut or a stall mid-body.
"""

import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1024
TICK = 0.1
SLOW_MAX = 600
_SLOW = re.compile(r"/slow/(\d{1,3})")


class Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 overflows under a director's probes plus a 20 req/s
    # client; a full accept queue drops SYNs, which would look like a failing node.
    request_queue_size = 128


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    peers_path = sys.argv[4] if len(sys.argv) > 4 else None
    body = (name + "\n").encode()
    lock = threading.Lock()
    peers = open(peers_path, "a", buffering=1) if peers_path else None  # noqa: SIM115

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            if peers is not None:
                with lock:
                    peers.write(self.client_address[0] + "\n")
                    peers.flush()
            slow = _SLOW.fullmatch(self.path)
            if slow:
                self._slow(min(int(slow.group(1)), SLOW_MAX))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _slow(self, seconds: int) -> None:
            ticks = round(seconds / TICK)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(ticks * CHUNK))
            self.end_headers()
            start = time.monotonic()
            for k in range(ticks):  # paced from the start, so a stall is not carried forward
                time.sleep(max(0.0, start + k * TICK - time.monotonic()))
                self.wfile.write(b"x" * CHUNK)
                self.wfile.flush()

        def log_message(self, format: str, *args: object) -> None:
            pass  # nobody reads the server's output once it is up

    server = Server(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    # The harness closes its end of the pipe after `ready`; never write to it again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    server.serve_forever()


if __name__ == "__main__":
    main()
