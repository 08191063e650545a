"""Reading one HTTP/1.1 response off a raw socket: what keep-alive tests need to see that a
connection survives an error."""

from __future__ import annotations

import socket


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the next response on `sock`; fails if the server closed it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )  # fmt: skip
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(head.split(b" ", 2)[1]), body
