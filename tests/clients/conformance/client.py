"""Conformance clients: the ways Python programs commonly speak TCP and HTTP.

``client.py KIND SCENARIO HOST PORT CELL N FILE RATE``

KIND
    ``socket``       a blocking socket, one thread (no timeout set)
    ``threads``      a blocking socket, a writer thread and a reader thread
    ``http.client``  the standard library's HTTP client
    ``urllib``       ``urllib.request.urlopen``
    ``asyncio``      asyncio streams (non-blocking sockets under an event loop)

SCENARIO is one of small, download, upload, duplex, half-close, rst-blocked,
rst-mid, slow-reader (what each asks of the server: see
tests/src/conformance/upstream.rs). N is the size the scenario moves, FILE
holds the bytes an upload or an echo sends (its first N), RATE is the
reading rate in bytes per second (0: as fast as possible).

It prints one line and exits 0, whatever happened:

    RESULT STATUS BYTES SHA256 DETAIL

STATUS is how the exchange ended: ``ok`` (complete), ``eof`` (the peer
closed cleanly before the end), ``reset`` (ECONNRESET), ``eagain``
(EAGAIN/EWOULDBLOCK on a blocking socket) or ``error``. BYTES and SHA256
are those of the body (or echo, or reply) received; DETAIL names the call
that failed and the exception.
"""

import asyncio
import hashlib
import http.client
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

KIND, SCENARIO, HOST = sys.argv[1], sys.argv[2], sys.argv[3]
PORT, CELL, N = int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
FILE, RATE = sys.argv[7], int(sys.argv[8])
CHUNK = 16 * 1024 if RATE else 256 * 1024


class Body:
    """What was received: length and SHA-256."""

    def __init__(self):
        self.n = 0
        self.hash = hashlib.sha256()
        self.start = time.monotonic()

    def add(self, data):
        self.n += len(data)
        self.hash.update(data)

    def pace(self):
        """Sleeps until RATE allows what was read so far."""
        if RATE:
            ahead = self.n / RATE - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def classify(exc):
    """ok/eof/reset/eagain/error for an exception (and its causes)."""
    seen = []
    e = exc
    while e is not None and e not in seen:
        seen.append(e)
        # RemoteDisconnected is a ConnectionResetError, but means a clean close.
        if isinstance(e, http.client.RemoteDisconnected):
            return "eof"
        if isinstance(e, ConnectionResetError):
            return "reset"
        if isinstance(e, BlockingIOError):
            return "eagain"
        if isinstance(e, (http.client.IncompleteRead, EOFError)):
            return "eof"
        if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
            e = e.reason
            continue
        e = e.__cause__ or e.__context__
    return "error"


def finish(status, body, detail="-"):
    detail = " ".join(str(detail).split()) or "-"
    print(f"RESULT {status} {body.n} {body.hash.hexdigest()} {detail}", flush=True)
    # Threads may still be blocked in the socket: leave without them.
    os._exit(0)


def fail(body, where, exc):
    finish(classify(exc), body, f"{where}: {exc!r}")


def payload():
    with open(FILE, "rb") as f:
        data = f.read(N)
    assert len(data) == N, f"{FILE} holds {len(data)} bytes, {N} needed"
    return data


def path():
    return {
        "small": f"/c/{CELL}/small",
        "download": f"/c/{CELL}/download/{N}",
        "slow-reader": f"/c/{CELL}/download/{N}",
        "upload": f"/c/{CELL}/upload",
        "rst-blocked": f"/c/{CELL}/reset-idle",
        "rst-mid": f"/c/{CELL}/reset-mid/{N}",
    }[SCENARIO]


# --- raw sockets: HTTP/1.1 by hand, or the echo and half-close protocols ---


def raw_request():
    """What the client writes: the HTTP request, or the preamble and data."""
    if SCENARIO in ("duplex", "half-close"):
        return [f"{CELL}\n".encode(), payload()], True
    if SCENARIO == "upload":
        head = (
            f"POST {path()} HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Content-Length: {N}\r\nConnection: close\r\n\r\n"
        )
        return [head.encode(), payload()], False
    head = f"GET {path()} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    return [head.encode()], False


def send(sock, parts, half_close):
    for part in parts:
        view = memoryview(part)
        for i in range(0, len(view), 256 * 1024):
            sock.sendall(view[i : i + 256 * 1024])
    if half_close:
        sock.shutdown(socket.SHUT_WR)


def receive(sock, body):
    """Reads to the end: the HTTP body (after the head), or everything."""
    http_response = SCENARIO not in ("duplex", "half-close")
    head = b""
    length = None
    while True:
        try:
            data = sock.recv(CHUNK)
        except OSError as e:
            fail(body, "recv", e)
        if not data:
            break
        if http_response and length is None:
            head += data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                continue
            lines = head[:end].decode("latin-1").split("\r\n")
            if not lines[0].startswith("HTTP/1.1 200"):
                finish("error", body, f"status: {lines[0]}")
            length = next(
                int(line.split(":", 1)[1])
                for line in lines
                if line.lower().startswith("content-length:")
            )
            data = head[end + 4 :]
        body.add(data)
        body.pace()
    if http_response and (length is None or body.n < length):
        finish("eof", body, f"recv: clean EOF after {body.n} of {length} body bytes")
    finish("ok", body)


def connect():
    return socket.create_connection((HOST, PORT))


def raw_socket():
    body = Body()
    sock = connect()
    parts, half_close = raw_request()
    try:
        send(sock, parts, half_close)
    except OSError as e:
        fail(body, "sendall", e)
    receive(sock, body)


def raw_threads():
    body = Body()
    sock = connect()
    parts, half_close = raw_request()
    failure = []

    def writer():
        try:
            send(sock, parts, half_close)
        except OSError as e:
            failure.append(e)
            fail(body, "writer sendall", e)

    def reader():
        receive(sock, body)

    w = threading.Thread(target=writer, daemon=True)
    r = threading.Thread(target=reader, daemon=True)
    w.start()
    r.start()
    r.join()
    w.join()


# --- HTTP libraries ---


def read_response(response, body):
    """Reads a response body in CHUNK reads; a short body is an EOF."""
    if response.status != 200:
        finish("error", body, f"status {response.status}")
    length = response.getheader("Content-Length")
    while True:
        try:
            data = response.read(CHUNK)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            fail(body, "read", e)
        if not data:
            break
        body.add(data)
        body.pace()
    if length is not None and body.n < int(length):
        finish("eof", body, f"read: clean EOF after {body.n} of {length} body bytes")
    finish("ok", body)


def http_client():
    body = Body()
    conn = http.client.HTTPConnection(HOST, PORT)
    try:
        if SCENARIO == "upload":
            conn.request("POST", path(), body=payload())
        else:
            conn.request("GET", path())
        response = conn.getresponse()
    except Exception as e:  # noqa: BLE001
        fail(body, "request", e)
    read_response(response, body)


def urllib_client():
    body = Body()
    url = f"http://{HOST}:{PORT}{path()}"
    data = payload() if SCENARIO == "upload" else None
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, data=data))
    except Exception as e:  # noqa: BLE001
        fail(body, "urlopen", e)
    read_response(response, body)


async def asyncio_main():
    body = Body()
    try:
        reader, writer = await asyncio.open_connection(HOST, PORT)
    except Exception as e:  # noqa: BLE001
        fail(body, "open_connection", e)
    parts, half_close = raw_request()

    async def write():
        try:
            for part in parts:
                view = memoryview(part)
                for i in range(0, len(view), 256 * 1024):
                    writer.write(view[i : i + 256 * 1024])
                    await writer.drain()
            if half_close:
                writer.write_eof()
        except Exception as e:  # noqa: BLE001
            fail(body, "write", e)

    async def read():
        length = None
        try:
            if SCENARIO not in ("duplex", "half-close"):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                if not lines[0].startswith("HTTP/1.1 200"):
                    finish("error", body, f"status: {lines[0]}")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines
                    if line.lower().startswith("content-length:")
                )
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                body.add(data)
                if RATE:
                    ahead = body.n / RATE - (time.monotonic() - body.start)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        except Exception as e:  # noqa: BLE001
            fail(body, "read", e)
        if length is not None and body.n < length:
            finish("eof", body, f"read: clean EOF after {body.n} of {length} body bytes")
        finish("ok", body)

    await asyncio.gather(write(), read())


KINDS = {
    "socket": raw_socket,
    "threads": raw_threads,
    "http.client": http_client,
    "urllib": urllib_client,
    "asyncio": lambda: asyncio.run(asyncio_main()),
}

try:
    KINDS[KIND]()
except Exception as e:  # noqa: BLE001 - a client that cannot even start says so
    fail(Body(), "client", e)
