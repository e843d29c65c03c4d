"""Container health check for ``newsrec worker``: exit 0 when GET /health answers 200.

Tries http://localhost:6066/health first, then the address the worker binds to
(NEWSREC_WEB_HOST, which compose sets to the container's own address so faust can route
requests between workers), then the container's address. Standard library only.
"""

import os
import socket
import sys
import urllib.request

port = os.environ.get("NEWSREC_WEB_PORT", "6066")
hosts = ["127.0.0.1"]
bound = os.environ.get("NEWSREC_WEB_HOST", "")
if bound and bound not in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
    hosts.append(bound)
try:
    hosts.append(socket.gethostbyname(socket.gethostname()))
except OSError:
    pass

for host in dict.fromkeys(hosts):
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=3) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        continue
sys.exit(1)
