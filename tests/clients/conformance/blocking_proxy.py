"""A transparent TCP proxy written the common way: blocking sockets, a thread
per direction.

``blocking_proxy.py UID``: started as root inside the pod's network
namespace and cgroup, it listens on 127.0.0.1:15001 (outbound) and
0.0.0.0:15006 (inbound), then drops to UID (its connects must not be
captured again) and prints ``listening``. For each connection it asks
``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` where it was going, connects there
(inbound from 127.0.0.6, the passthrough source), and runs one thread per
direction: blocking ``recv`` then ``sendall``. An end of stream is passed
on as one (``shutdown(SHUT_WR)``), a reset as a reset (``SO_LINGER`` 0 and
close); any other error on a socket ends the connection the same way, and
is logged on stderr.
"""

import os
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80
BUFFER = 64 * 1024


def log(*args):
    print("blocking-proxy:", *args, file=sys.stderr, flush=True)


def original_dst(conn):
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    (port,) = struct.unpack("!H", raw[2:4])
    return socket.inet_ntoa(raw[4:8]), port


class Connection:
    def __init__(self, downstream, upstream, label):
        self.sockets = (downstream, upstream)
        self.label = label
        self.abort = False

    def pump(self, src, dst, direction):
        try:
            while True:
                data = src.recv(BUFFER)
                if not data:
                    # Half-close: the peer is done sending; so are we.
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except ConnectionResetError:
            pass
        except OSError as e:
            if not self.abort:  # not the wake-up of the other direction's abort
                log(f"{self.label} {direction}: {e!r}")
        # The stream is broken: the other side learns it as a reset, once
        # the other direction's thread lets go of the socket (a shutdown
        # wakes it if it is blocked reading).
        self.abort = True
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def run(self):
        downstream, upstream = self.sockets
        threads = [
            threading.Thread(target=self.pump, args=(downstream, upstream, "client->upstream")),
            threading.Thread(target=self.pump, args=(upstream, downstream, "upstream->client")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in self.sockets:
            if self.abort:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


def handle(conn, inbound):
    try:
        dst = original_dst(conn)
        source = ("127.0.0.6", 0) if inbound else None
        upstream = socket.create_connection(dst, source_address=source)
    except OSError as e:
        log(f"connect: {e!r}")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        return
    Connection(conn, upstream, f"{'inbound' if inbound else 'outbound'} {dst[0]}:{dst[1]}").run()


def serve(listener, inbound):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, inbound), daemon=True).start()


def listen(address):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(address)
    s.listen(1024)
    return s


def main():
    uid = int(sys.argv[1])
    outbound = listen(("127.0.0.1", 15001))
    inbound = listen(("0.0.0.0", 15006))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    threading.Thread(target=serve, args=(inbound, True), daemon=True).start()
    print("listening", flush=True)
    serve(outbound, False)


main()
