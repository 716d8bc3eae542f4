"""A LAN made by a test or a benchmark: network namespaces on a bridge, optional ``tc`` caps.

It lives in the package (like ``appliance.tiny_model``) so the tests and ``bench/`` import it the
same way, without editing ``sys.path``.


``Lan(n)`` creates ``n`` host namespaces, each with one veth into a bridge living in a switch
namespace, addresses 10.<x>.0.1..n/24, loopback up, multicast on (mDNS works across it). Nothing
touches the machine's own interfaces or any outside address. Needs root and ``ip``; tests call
``Lan.available()`` and skip otherwise. ``run``/``spawn`` start commands inside a host.
``rate`` caps each host's upload with ``tc`` tbf; ``both_ways=True`` caps its download too (a
tbf on the switch side of its veth), as on a real full-duplex link. ``prefix`` names the
namespaces (``<prefix>sw``, ``<prefix>h<i>``) so a benchmark never collides with the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import appliance

# Children run ``python -m appliance.cli.main`` from the directory holding this package, so
# they import the same appliance as the caller (installed, or a checkout).
PACKAGE_PARENT = Path(appliance.__file__).resolve().parent.parent


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Lan:
    def __init__(self, hosts: int, *, rate: str | None = None, both_ways: bool = False,
                 prefix: str | None = None) -> None:
        tag = f"{os.getpid() % 100000:05d}"
        self.switch = f"apsw{tag}" if prefix is None else f"{prefix}sw"
        self.hosts = [f"aph{tag}{i}" if prefix is None else f"{prefix}h{i}" for i in range(hosts)]
        self.both_ways = both_ways
        self.subnet = 100 + os.getpid() % 100
        self.addresses = [f"10.{self.subnet}.0.{i + 1}" for i in range(hosts)]
        self._made: list[str] = []
        try:
            self._build(rate)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def available() -> str | None:
        """None when namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "needs root for network namespaces"
        if shutil.which("ip") is None:
            return "iproute2 (ip) is not installed"
        probe = f"approbe{os.getpid() % 100000}"
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if result.returncode != 0:
            return f"cannot create a network namespace: {result.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def _build(self, rate: str | None) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        for i, ns in enumerate(self.hosts):
            _ip("netns", "add", ns)
            self._made.append(ns)
            inner, outer = f"eth{i}", f"p{i}"
            _ip("-n", ns, "link", "add", inner, "type", "veth", "peer", "name", outer,
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", outer, "master", "br0")
            _ip("-n", self.switch, "link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if rate is not None:
                self._cap(ns, inner, rate)
                if self.both_ways:
                    self._cap(self.switch, outer, rate)

    @staticmethod
    def _cap(ns: str, dev: str, rate: str) -> None:
        """A token bucket on ``dev``'s egress inside ``ns``."""
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
             "tbf", "rate", rate, "burst", "256kb", "latency", "200ms"],
            check=True, capture_output=True,
        )

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def appliance(self, host: int, *args: str) -> list[str]:
        return self.command(host, [sys.executable, "-m", "appliance.cli.main", *args])

    def run(self, host: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.appliance(host, *args), capture_output=True, text=True,
                              timeout=timeout, cwd=PACKAGE_PARENT)

    def spawn(self, host: int, argv: Sequence[str]) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(self.command(host, argv), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=PACKAGE_PARENT,
                                env=env)

    def serve(self, host: int, *args: str) -> subprocess.Popen[str]:
        """``appliance ARGS`` started in ``host`` (e.g. a peer server)."""
        return self.spawn(host, [sys.executable, "-m", "appliance.cli.main", *args])

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Loopback(Lan):
    """The fallback when namespaces cannot be made: every host is 127.0.0.1 (no mDNS)."""

    def __init__(self, hosts: int) -> None:
        self.hosts = [f"loopback{i}" for i in range(hosts)]
        self.addresses = ["127.0.0.1"] * hosts
        self._made = []

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        return list(argv)


def make_lan(hosts: int, *, rate: str | None = None) -> Lan:
    """Namespaces when possible, else the loopback fallback (``isinstance(x, Loopback)``)."""
    return Lan(hosts, rate=rate) if Lan.available() is None else Loopback(hosts)
