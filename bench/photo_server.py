"""A lean static file server for the benchmarks: keep-alive and zero-copy `sendfile`, like a real web server.

    python bench/photo_server.py PORT FOLDER

Python's `http.server` copies every body through user space and closes every connection, which on
a 2-core machine takes CPU from the downloaders being measured.
"""

import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that want it

    def copyfile(self, source, outputfile) -> None:
        outputfile.flush()
        self.connection.sendfile(source)

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    port, folder = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, directory=folder))
    server.daemon_threads = True
    server.serve_forever()
