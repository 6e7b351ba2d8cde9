"""A small authoritative DNS server for the tests, over UDP and TCP.

``dns_server.py [--uid N] TAG A AAAA ADDR:PORT...``: as uid and gid N
if given (the proxy's own, as istio's DNS proxy runs), answers every A query with A and
every AAAA query with AAAA (any name; other types: no answer), on each
address, UDP and TCP (several length-prefixed queries per connection, as
glibc sends them). Each query is logged on stdout, as it arrives:
``TAG udp|tcp NAME TYPE PEER``. ``ready`` is printed once every socket is
bound.
"""

import ipaddress
import os
import socket
import struct
import sys
import threading

ARGS = sys.argv[1:]
if ARGS[0] == "--uid":
    os.setgroups([])
    os.setgid(int(ARGS[1]))
    os.setuid(int(ARGS[1]))
    ARGS = ARGS[2:]
TAG, A, AAAA = ARGS[0], ARGS[1], ARGS[2]
LISTEN = ARGS[3:]
TYPES = {1: "A", 28: "AAAA"}
lock = threading.Lock()


def log(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def parse_question(msg):
    """The question's name, type and the offset past it."""
    labels, i = [], 12
    while msg[i]:
        n = msg[i]
        labels.append(msg[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    qtype, _qclass = struct.unpack("!HH", msg[i + 1 : i + 5])
    return ".".join(labels), qtype, i + 5


def answer(msg, proto, peer):
    name, qtype, end = parse_question(msg)
    log(f"{TAG} {proto} {name} {TYPES.get(qtype, qtype)} {peer}")
    rdata = None
    if qtype == 1:
        rdata = ipaddress.IPv4Address(A).packed
    elif qtype == 28:
        rdata = ipaddress.IPv6Address(AAAA).packed
    flags = 0x8180 | (struct.unpack("!H", msg[2:4])[0] & 0x0100)
    header = msg[:2] + struct.pack("!HHHHH", flags, 1, 1 if rdata else 0, 0, 0)
    reply = header + msg[12:end]
    if rdata:
        reply += struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata
    return reply


def serve_udp(sock):
    while True:
        msg, peer = sock.recvfrom(4096)
        sock.sendto(answer(msg, "udp", peer[0]), peer)


def read_exact(conn, n):
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def serve_tcp_conn(conn, peer):
    with conn:
        while True:
            head = read_exact(conn, 2)
            if head is None:
                return
            msg = read_exact(conn, struct.unpack("!H", head)[0])
            if msg is None:
                return
            reply = answer(msg, "tcp", peer[0])
            conn.sendall(struct.pack("!H", len(reply)) + reply)


def serve_tcp(sock):
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=serve_tcp_conn, args=(conn, peer), daemon=True).start()


threads = []
for spec in LISTEN:
    host, port = spec.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind, serve in ((socket.SOCK_DGRAM, serve_udp), (socket.SOCK_STREAM, serve_tcp)):
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, int(port)))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        threads.append(threading.Thread(target=serve, args=(s,), daemon=True))
for t in threads:
    t.start()
log("ready")
for t in threads:
    t.join()
