"""Keep-alive HTTP/1.1 GETs with Python's own client on a socket of the
address's family (AF_INET6 for ``::ffff:a.b.c.d`` and native IPv6).

``http_get.py HOST PORT N``: N requests on one connection; the bodies, in
order, on stdout; the socket's family on stderr.
"""

import http.client
import socket
import sys

host, port, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_STREAM)
sock.settimeout(30)
sock.connect((host, port))
print(sock.family.name, file=sys.stderr)
conn = http.client.HTTPConnection(host, port)
conn.sock = sock
out = sys.stdout.buffer
for i in range(requests):
    conn.request("GET", "/")
    response = conn.getresponse()
    if response.status != 200:
        sys.exit(f"request {i}: status {response.status}")
    out.write(response.read())
out.flush()
