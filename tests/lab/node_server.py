"""A Kubernetes node's backend stand-in: answers every GET with the node's name.

Run inside a node namespace with the host's stdlib-only python3:
``node_server.py <name> <port> <lab id>`` (the id only marks the process as the lab's).
Prints ``ready`` once listening, then keeps quiet.
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    body = (name + "\n").encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # nobody reads the server's output once it is up

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    # The harness closes its end of the pipe after `ready`; never write to it again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    server.serve_forever()


if __name__ == "__main__":
    main()
