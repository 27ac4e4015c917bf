"""A userspace TCP proxy that counts and keeps bytes, and can emulate a wide-area link.

It forwards bytes both ways, counts them, can keep what the server sent, and can emulate a link
with delay, bandwidth and loss (this kernel has no ``netem``). Used by bench/remote.py to
measure wire bytes, by the wire-scan test to inspect them, and, with a :class:`Link`, to put a
teacher node behind an emulated WAN: on loopback, or in the multi-host setup (bench/netns.py),
where the upstream is a node's namespace address and the student names that address as the
TLS ``server_name``. As a program, in any host or namespace::

    python bench/tcp_proxy.py --upstream HOST:PORT [--listen HOST:PORT] [--delay-ms D]
                              [--rate-mbit R] [--loss P] [--rto-ms T] [--seed S]

**The link model**, for each direction of each connection on its own. Data is forwarded in
pieces of at most ``piece_bytes``.

- *Rate*: a token bucket of ``rate_bytes_per_s`` and depth ``burst_bytes`` (at least one
  piece); a piece leaves once the bucket holds its size, so a long transfer takes
  ``size / rate``.
- *Delay*: a piece arrives ``delay_s`` after it left (one-way propagation delay; a request and
  its reply through the proxy take at least ``2 * delay_s`` more).
- *Loss*: a proxy cannot drop bytes (each side's kernel has already acknowledged them), so a
  loss is emulated by what it costs a TCP connection: with probability ``loss`` a piece
  arrives one retransmission timeout ``rto_s`` late, and, the stream being delivered in order,
  everything behind it waits too (head-of-line blocking). Fast retransmit (about one round
  trip) is not modelled: set ``rto_s`` to the round trip to model it. Pieces, not packets,
  are lost: with pieces of 16 KiB (about 11 segments of 1448 bytes), ``loss`` p per piece is
  roughly a packet loss rate of p / 11.
- *Buffer*: at most ``buffer_bytes`` per direction wait in the proxy; then it stops reading,
  and TCP flow control pushes back on the sender, as at a real bottleneck.

Pieces are scheduled when they are read, on a monotonic clock, and written when due: a writer
woken late catches up on the schedule instead of shifting it.

The fault-tolerance test uses ``refused`` to see a client knock on a node that is down, and
re-points ``upstream`` at the node's replacement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import queue
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_POLL_S = 0.2


@dataclass(frozen=True)
class Link:
    """One direction's emulated link; both directions of a connection get the same, each its own.

    Attributes:
        delay_s: One-way delay (a round trip through the proxy adds twice this).
        rate_bytes_per_s: Bandwidth of each direction; None: unlimited.
        burst_bytes: Depth of the rate's token bucket (raised to one piece if smaller).
        loss: Probability that a piece is delayed by one retransmission timeout.
        rto_s: The retransmission timeout a loss costs.
        seed: Seed of the losses (each direction draws from its own generator).
        piece_bytes: Largest piece forwarded at once.
        buffer_bytes: Bytes that may wait in the proxy per direction.
    """

    delay_s: float = 0.0
    rate_bytes_per_s: float | None = None
    burst_bytes: int = 16 * 1024
    loss: float = 0.0
    rto_s: float = 0.2
    seed: int = 0
    piece_bytes: int = 16 * 1024
    buffer_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.rto_s < 0:
            raise ValueError("delay_s and rto_s must be >= 0")
        if self.rate_bytes_per_s is not None and not self.rate_bytes_per_s > 0:
            raise ValueError("rate_bytes_per_s must be > 0 (or None: unlimited)")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError("loss must be a probability in [0, 1]")
        if self.piece_bytes < 1 or self.buffer_bytes < self.piece_bytes:
            raise ValueError("piece_bytes must be >= 1 and buffer_bytes >= piece_bytes")

    @classmethod
    def wan(
        cls, round_trip_ms: float, mbit_per_s: float | None, loss: float = 0.0, seed: int = 0
    ) -> Link:
        """A link by round trip (ms) and bandwidth (Mbit/s each way), the way links are quoted."""
        rate = None if mbit_per_s is None else mbit_per_s * 1e6 / 8
        return cls(delay_s=round_trip_ms / 2000, rate_bytes_per_s=rate, loss=loss, seed=seed)


class LinkSchedule:
    """When each piece of one direction arrives (the link model above, pure arithmetic).

    Args:
        link: The link.
        rng: Randomness of the losses.
        now: The clock at creation (the bucket starts full).
    """

    def __init__(self, link: Link, rng: random.Random, now: float) -> None:
        self.link = link
        self.rng = rng
        self.burst = max(link.burst_bytes, link.piece_bytes)
        self.tokens = float(self.burst)
        self.updated = now
        self.last_arrival = -math.inf
        self.losses = 0

    def arrival(self, now: float, size: int) -> float:
        """The time a piece of ``size`` bytes read at ``now`` arrives at the other side."""
        rate = self.link.rate_bytes_per_s
        leaves = now
        if rate is not None:
            leaves = max(now, self.updated)
            tokens = min(self.burst, self.tokens + rate * (leaves - self.updated))
            if tokens < size:
                leaves += (size - tokens) / rate
                tokens = float(size)
            self.tokens, self.updated = tokens - size, leaves
        arrives = leaves + self.link.delay_s
        if self.link.loss and self.rng.random() < self.link.loss:
            self.losses += 1
            arrives += self.link.rto_s
        self.last_arrival = max(arrives, self.last_arrival)  # a stream arrives in order
        return self.last_arrival


class RecordingProxy:
    """Listens on ``listen`` (default 127.0.0.1, a free port) and forwards to ``upstream``.

    A connection whose upstream refuses it is closed and counted in ``refused``; ``upstream``
    may be changed while the proxy runs (new connections go there).

    Args:
        upstream: (host, port) of the server.
        keep: Keep the bytes the server sent (``from_server``).
        link: Emulate this link in each direction; None forwards at once.
        listen: (host, port) to listen on.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        keep: bool = True,
        link: Link | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.upstream = upstream
        self.keep = keep
        self.link = link
        self.from_server = bytearray()
        self.from_server_count = 0
        self.to_server = 0
        self.refused = 0
        #: Pieces delayed by an emulated loss, over all connections and directions.
        self.losses = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(listen)
        self._listener.settimeout(_POLL_S)
        self.host = listen[0]
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._connections = 0
        self._start(self._accept)

    @property
    def address(self) -> str:
        """host:port to connect to instead of the upstream."""
        return f"{self.host}:{self.port}"

    @property
    def total(self) -> int:
        """Bytes forwarded in both directions so far."""
        with self._lock:
            return self.from_server_count + self.to_server

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

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
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections += 1
            for source, target, from_server in ((client, server, False), (server, client, True)):
                if self.link is None:
                    self._start(self._pump, source, target, from_server)
                else:
                    rng = random.Random(f"{self.link.seed}-{self._connections}-{from_server}")
                    schedule = LinkSchedule(self.link, rng, time.monotonic())
                    pieces: queue.Queue[tuple[float, bytes] | None] = queue.Queue(
                        max(1, self.link.buffer_bytes // self.link.piece_bytes)
                    )
                    self._start(self._read, source, target, from_server, schedule, pieces)
                    self._start(self._deliver, source, target, pieces)

    def _count(self, chunk: bytes, from_server: bool) -> None:
        with self._lock:
            if from_server:
                self.from_server_count += len(chunk)
                if self.keep:
                    self.from_server += chunk
            else:
                self.to_server += len(chunk)

    def _receive(self, source: socket.socket, size: int) -> bytes | None:
        """The next chunk, b"" at the end of the stream, None when stopped."""
        while not self._stop.is_set():
            try:
                return source.recv(size)
            except TimeoutError:
                continue
            except OSError:
                return b""
        return None

    def _pump(self, source: socket.socket, target: socket.socket, from_server: bool) -> None:
        source.settimeout(_POLL_S)
        while chunk := self._receive(source, 65536):
            self._count(chunk, from_server)
            try:
                target.sendall(chunk)
            except OSError:
                break
        self._shut(source, target)

    def _read(
        self,
        source: socket.socket,
        target: socket.socket,
        from_server: bool,
        schedule: LinkSchedule,
        pieces: queue.Queue[tuple[float, bytes] | None],
    ) -> None:
        source.settimeout(_POLL_S)
        while chunk := self._receive(source, schedule.link.piece_bytes):
            self._count(chunk, from_server)
            due = schedule.arrival(time.monotonic(), len(chunk))
            while not self._put(pieces, (due, chunk)):
                if self._stop.is_set():
                    return
        with self._lock:
            self.losses += schedule.losses
        while not self._put(pieces, None) and not self._stop.is_set():
            pass

    def _put(
        self, pieces: queue.Queue[tuple[float, bytes] | None], item: tuple[float, bytes] | None
    ) -> bool:
        try:
            pieces.put(item, timeout=_POLL_S)
        except queue.Full:
            return False
        return True

    def _deliver(
        self,
        source: socket.socket,
        target: socket.socket,
        pieces: queue.Queue[tuple[float, bytes] | None],
    ) -> None:
        while not self._stop.is_set():
            try:
                item = pieces.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is None:
                break
            due, chunk = item
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            try:
                target.sendall(chunk)
            except OSError:
                break
        self._shut(source, target)

    @staticmethod
    def _shut(source: socket.socket, target: socket.socket) -> None:
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

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main() -> None:
    """Run a proxy until SIGINT or SIGTERM; print its address, and at the end its byte count.

    The last line it prints is ``{"total_bytes": N}`` (both directions, all connections).
    """
    parser = argparse.ArgumentParser(description="a TCP proxy that can emulate a WAN link")
    parser.add_argument("--upstream", required=True, type=_host_port)
    parser.add_argument("--listen", default=("127.0.0.1", 0), type=_host_port)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--rate-mbit", type=float, default=None, help="Mbit/s each way")
    parser.add_argument("--loss", type=float, default=0.0, help="probability per 16 KiB piece")
    parser.add_argument("--rto-ms", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    link = Link(
        delay_s=args.delay_ms / 1000,
        rate_bytes_per_s=None if args.rate_mbit is None else args.rate_mbit * 1e6 / 8,
        loss=args.loss,
        rto_s=args.rto_ms / 1000,
        seed=args.seed,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with RecordingProxy(args.upstream, keep=False, link=link, listen=args.listen) as proxy:
        print(proxy.address, flush=True)
        stop.wait()
    print(json.dumps({"total_bytes": proxy.total}), flush=True)


if __name__ == "__main__":
    main()
