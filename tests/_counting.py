"""A loopback proxy in front of an S3-protocol server that counts the requests sent through
it, by method, for one object (a test or benchmark sees what the server asks the store)."""

from __future__ import annotations

import re
import socket
import threading

from tests._proxy import TcpProxy, _close

REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (/\S*) HTTP/1\.1\r\n")


class CountingProxy(TcpProxy):
    """A ``TcpProxy`` that keeps what is sent upstream, to read the request lines back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._sent: list[bytearray] = []
        self._record_lock = threading.Lock()
        super().__init__(target)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            upstream = sink.getpeername() == self.target
        except OSError:
            upstream = False
        if not upstream:
            super()._pipe(source, sink)
            return
        record = bytearray()
        with self._record_lock:
            self._sent.append(record)
        try:
            while data := source.recv(65536):
                self._on_chunk(source, sink, data)
                record += data  # all of it: a request line may start anywhere in a chunk
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)

    def requests(self, name: str) -> list[bytes]:
        """Methods of the requests sent so far whose path names ``name`` (a digest, a key)."""
        with self._record_lock:
            sent = b"\n".join(bytes(r) for r in self._sent)
        return [m.group(1) for m in REQUEST.finditer(sent) if name.encode() in m.group(2)]
