"""A bulk album lookup: POST {"ids": [...]} -> {"results": [{"index": i, "id": ..., "title": ...}, ...]}.

With swap=True, the answer for the call holding albums 102 and 103 has those two results
traded: the way a real service's reordering bug looks from the client.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SWAPPED = (102, 103)


class Handler(BaseHTTPRequestHandler):
    swap = True

    def do_POST(self):
        ids = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["ids"]
        results = [{"index": i, "id": album, "title": f"Album {album}"} for i, album in enumerate(ids)]
        if self.swap and all(album in ids for album in SWAPPED):
            a, b = (ids.index(album) for album in SWAPPED)
            results[a], results[b] = results[b], results[a]
        body = json.dumps({"results": results}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start(port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    server = start(int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
    print(f"album service on http://127.0.0.1:{server.server_port}/lookup")
    threading.Event().wait()
