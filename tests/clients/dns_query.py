"""DNS the ways an app resolves, for the tests.

``dns_query.py [--uid N] ...`` runs as uid and gid N (the proxy's own
queries).

``dns_query.py getaddrinfo NAME``: Python's getaddrinfo (glibc's resolver),
every address on a line.

``dns_query.py sendto SERVER PORT NAME``: one A query on an unconnected UDP
socket (sendto/recvfrom, as Go's and some hand-written resolvers do); the
reply's source and its first A record: ``SOURCE_IP SOURCE_PORT ADDRESS``.
"""

import ipaddress
import os
import socket
import struct
import sys


def getaddrinfo(name):
    seen = []
    for *_, sockaddr in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM):
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    print("\n".join(seen))


def sendto(server, port, name):
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    query = struct.pack("!HHHHHH", 0x4D52, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        query += bytes([len(label)]) + label.encode()
    query += b"\0" + struct.pack("!HH", 1, 1)
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.sendto(query, (server, port))
    reply, source = s.recvfrom(4096)
    assert reply[:2] == query[:2], "reply to another query"
    print(source[0], source[1], ipaddress.IPv4Address(reply[-4:]))


args = sys.argv[1:]
if args[0] == "--uid":
    os.setgroups([])
    os.setgid(int(args[1]))
    os.setuid(int(args[1]))
    args = args[2:]
if args[0] == "getaddrinfo":
    getaddrinfo(args[1])
else:
    sendto(args[1], int(args[2]), args[3])
