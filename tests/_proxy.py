"""A TCP proxy on loopback that a test can cut, restore and slow down: a dependency
(PostgreSQL, the S3 endpoint) going away and coming back, without touching the real one,
which other tests share."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests._services import free_port

_ACCEPT_POLL_S = 0.1


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``.

    ``cut()`` drops every open connection and refuses new ones (connection refused);
    ``restore()`` listens again on the same port; ``delay`` sleeps before each forwarded
    chunk (a slow dependency).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.delay = 0.0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listening = threading.Event()
        self._listener: threading.Thread | None = None
        self.restore()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restore(self) -> None:
        if self._listening.is_set():
            return
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(128)
        server.settimeout(_ACCEPT_POLL_S)
        self._listening.set()
        self._listener = threading.Thread(target=self._accept, args=(server,), daemon=True)
        self._listener.start()

    def cut(self) -> None:
        self._listening.clear()
        if self._listener is not None:
            self._listener.join(5)
            self._listener = None
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            _close(connection)

    close = cut

    def _accept(self, server: socket.socket) -> None:
        with server:
            while self._listening.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _close(client)
            return
        for sock in (client, upstream):
            sock.settimeout(None)
        with self._lock:
            self._connections.update((client, upstream))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._on_chunk(source, sink, data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(source)
                self._connections.discard(sink)
            _close(source)
            _close(sink)

    def _on_chunk(self, source: socket.socket, sink: socket.socket, data: bytes) -> None:
        """Before each chunk is forwarded: where a subclass shapes the link."""
        if self.delay:
            time.sleep(self.delay)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
