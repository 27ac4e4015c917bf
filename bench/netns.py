"""Several "hosts" on one Linux machine: network namespaces joined to it by veth pairs.

Used by the multi-host test (tests/integration/test_multihost.py) and bench/remote.py. Host
``i`` is a namespace with its own address on a private /24 chosen at random from 10.213.0.0/16:
the pair ``i`` is the /30 ``10.213.X.4i``, this machine's side is ``.4i+1``, the namespace's side
``.4i+2``. Processes started with :meth:`VirtualHost.exec_prefix` see only that namespace's
interfaces, so a server bound to its address is reachable from this machine only over the veth
link, which :meth:`VirtualHosts.link_down` cuts.

An ``unreachable`` route for the whole /24 keeps packets on this machine: with a link down its
/30 route is gone, and without that route packets for the namespace would follow the default
route out of the machine. Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN);
:func:`unavailable_reason` says why it cannot be done here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import TracebackType

logger = logging.getLogger(__name__)

SUBNET_PREFIX = "10.213"
_ATTEMPTS = 20


class NamespaceError(RuntimeError):
    """Namespaces or links could not be created here (not root, no ``ip``, not Linux)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NamespaceError(f"'ip {' '.join(args)}' failed: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be created here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    name = f"cdfkd-probe-{secrets.token_hex(4)}"
    try:
        result = _ip("netns", "add", name, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"'ip netns add' cannot run: {error}"
    if result.returncode != 0:
        return (
            "'ip netns add' failed (needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN): "
            + result.stderr.strip()
        )
    _ip("netns", "delete", name, check=False)
    return None


@dataclass(frozen=True)
class VirtualHost:
    """One namespace and the veth pair that joins it to this machine."""

    namespace: str
    link: str
    """The veth on this machine's side; ``ip link set LINK down`` cuts the host off."""
    address: str
    """The namespace's address (bind servers here)."""
    gateway: str
    """This machine's address on the link."""

    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]


class VirtualHosts:
    """``count`` namespaces on a fresh private /24, removed again by :meth:`close`.

    A context manager; :meth:`close` also runs on errors half-way through creation and kills
    any process still inside its namespaces (processes this object's user started there).
    """

    def __init__(self, count: int) -> None:
        if not 1 <= count <= 63:
            raise ValueError("count must be 1..63 (a /30 per host in one /24)")
        self.count = count
        self.token = secrets.token_hex(3)
        self.subnet = ""
        self.hosts: list[VirtualHost] = []
        self._namespaces: list[str] = []
        self._links: list[str] = []

    def create(self) -> list[VirtualHost]:
        """Create the namespaces, links and routes.

        Raises:
            NamespaceError: naming the command that failed; everything made so far is removed.
        """
        try:
            self._claim_subnet()
            for index in range(self.count):
                self.hosts.append(self._create_host(index))
        except BaseException:
            self.close()
            raise
        return self.hosts

    def _claim_subnet(self) -> None:
        used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
        for _ in range(_ATTEMPTS):
            subnet = f"{SUBNET_PREFIX}.{secrets.randbelow(256)}"
            if f"{subnet}." in used:
                continue
            if _ip("route", "add", "unreachable", f"{subnet}.0/24", check=False).returncode == 0:
                self.subnet = subnet
                return
        raise NamespaceError(f"no free /24 in {SUBNET_PREFIX}.0.0/16 after {_ATTEMPTS} tries")

    def _create_host(self, index: int) -> VirtualHost:
        namespace = f"cdfkd-{self.token}-{index}"
        link, peer = f"cdk{self.token}h{index}", f"cdk{self.token}n{index}"
        gateway, address = f"{self.subnet}.{4 * index + 1}", f"{self.subnet}.{4 * index + 2}"
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("link", "add", link, "type", "veth", "peer", "name", peer)
        self._links.append(link)
        _ip("link", "set", peer, "netns", namespace)
        _ip("addr", "add", f"{gateway}/30", "dev", link)
        _ip("link", "set", link, "up")
        inside = ("-n", namespace)
        _ip(*inside, "addr", "add", f"{address}/30", "dev", peer)
        _ip(*inside, "link", "set", peer, "up")
        _ip(*inside, "link", "set", "lo", "up")
        return VirtualHost(namespace, link, address, gateway)

    def link_down(self, host: VirtualHost) -> None:
        """Cut ``host`` off: this machine's side of its link goes down."""
        _ip("link", "set", host.link, "down")

    def link_up(self, host: VirtualHost) -> None:
        """Reconnect ``host`` (its /30 route comes back with the link)."""
        _ip("link", "set", host.link, "up")

    def close(self) -> None:
        """Kill what still runs in the namespaces, delete links, namespaces and the route."""
        for namespace in self._namespaces:
            pids = _ip("netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for link in self._links:
            _ip("link", "delete", link, check=False)  # deletes its peer too
        for namespace in self._namespaces:
            result = _ip("netns", "delete", namespace, check=False)
            if result.returncode != 0:
                logger.warning("could not delete namespace %s: %s", namespace, result.stderr)
        if self.subnet:
            _ip("route", "delete", "unreachable", f"{self.subnet}.0/24", check=False)
        self._links, self._namespaces, self.subnet = [], [], ""

    def __enter__(self) -> list[VirtualHost]:
        return self.create()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
