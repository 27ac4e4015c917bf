"""A TCP proxy on loopback: forwards bytes both ways, counts them, can keep what the server sent.

Used by bench/remote.py to measure wire bytes, by the wire-scan test to inspect them, and by
the fault-tolerance test to see a client knock on a node that is down (``refused``) and to
point it at the node's replacement (``upstream``).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class RecordingProxy:
    """Listens on 127.0.0.1:0 and forwards every connection to ``upstream`` (host, port).

    A connection whose upstream refuses it is closed and counted in ``refused``; ``upstream``
    may be changed while the proxy runs (new connections go there).
    """

    def __init__(self, upstream: tuple[str, int], keep: bool = True) -> None:
        self.upstream = upstream
        self.keep = keep
        self.from_server = bytearray()
        self.from_server_count = 0
        self.to_server = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def address(self) -> str:
        """host:port to connect to instead of the upstream."""
        return f"127.0.0.1:{self.port}"

    @property
    def total(self) -> int:
        """Bytes forwarded in both directions so far."""
        with self._lock:
            return self.from_server_count + self.to_server

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                with self._lock:
                    self.refused += 1
                client.close()
                continue
            self._sockets += [client, server]
            for source, target, inbound in ((client, server, False), (server, client, True)):
                thread = threading.Thread(
                    target=self._pump, args=(source, target, inbound), daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, target: socket.socket, from_server: bool) -> None:
        source.settimeout(0.2)
        while not self._stop.is_set():
            try:
                chunk = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            with self._lock:
                if from_server:
                    self.from_server_count += len(chunk)
                    if self.keep:
                        self.from_server += chunk
                else:
                    self.to_server += len(chunk)
            try:
                target.sendall(chunk)
            except OSError:
                break
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop forwarding and close every socket."""
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(timeout=2)
