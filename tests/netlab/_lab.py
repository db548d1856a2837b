"""A small internet in Linux network namespaces: a public segment and NATed home LANs.

Topology (every address lives inside namespaces this module made)::

    public segment 203.0.113.0/24 (TEST-NET-3), a bridge in namespace "inet"
      |-- public hosts      203.0.113.10, .11, ...   (relay, bootstrap)
      |-- router of home 1  203.0.113.101 (WAN) -- LAN 10.1.0.0/24, router 10.1.0.1
      |       \\-- LAN hosts 10.1.0.10, .11, ...     (a bridge in the router's namespace)
      \\-- router of home 2  203.0.113.102 (WAN) -- LAN 10.2.0.0/24 ...

A router MASQUERADEs its LAN out of its WAN interface and drops unsolicited inbound
traffic the way a home router does: NEW or INVALID packets arriving on the WAN are
dropped in INPUT (so that a probe reaching the router before its host has sent anything
leaves no conntrack entry that would make MASQUERADE pick another source port) and
FORWARD only lets replies in. The default is a port-restricted cone NAT (Linux keeps
the inside port when it is free); ``symmetric=True`` adds ``--random-fully``, which
gives every destination its own random port.

Namespaces are named ``sw<pid>x<n>-<role>`` and all deleted by ``close()`` (and at exit
should a test run be killed between set-up and teardown).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

PUBLIC_PREFIX = "203.0.113"
_counter = itertools.count()
_live: set[str] = set()


class LabUnavailable(Exception):
    """This machine cannot build the lab (not root, no namespaces, no iptables)."""


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _delete_all() -> None:
    for ns in list(_live):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        _live.discard(ns)


atexit.register(_delete_all)


def unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    if shutil.which("iptables") is None:
        return "iptables is missing (apt-get install -y iptables)"
    probe = f"sw{os.getpid()}probe"
    try:
        _run("ip", "netns", "add", probe)
    except (RuntimeError, OSError) as exc:
        return f"this kernel or sandbox has no network namespaces: {exc}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@dataclass(frozen=True)
class Node:
    """A namespace with one interface on a segment: ``ip netns exec <ns> ...`` runs in it."""

    ns: str
    ip: str
    iface: str = "eth0"

    def argv(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *command]

    def sh(self, *command: str) -> str:
        return _run(*self.argv(*command))


@dataclass
class Home:
    """A home LAN behind a NAT router."""

    index: int
    router: Node
    symmetric: bool
    hosts: list[Node] = field(default_factory=list)

    @property
    def wan_ip(self) -> str:
        return self.router.ip

    @property
    def lan_prefix(self) -> str:
        return f"10.{self.index}.0"


class Lab:
    """Builds the topology step by step; ``close()`` deletes every namespace it made."""

    def __init__(self) -> None:
        self.tag = f"sw{os.getpid()}x{next(_counter)}"
        self._namespaces: list[str] = []
        self.homes: list[Home] = []
        self.public: list[Node] = []
        self.inet = self._namespace("inet")
        self._link_up(self.inet, "lo")
        _run("ip", "-n", self.inet, "link", "add", "br0", "type", "bridge")
        self._link_up(self.inet, "br0")

    # -- building ----------------------------------------------------------------------

    def _namespace(self, role: str) -> str:
        ns = f"{self.tag}-{role}"
        _run("ip", "netns", "add", ns)
        _live.add(ns)
        self._namespaces.append(ns)
        self._link_up(ns, "lo")
        return ns

    @staticmethod
    def _link_up(ns: str, iface: str) -> None:
        _run("ip", "-n", ns, "link", "set", iface, "up")

    def _wire(self, ns: str, iface: str, switch_ns: str, bridge: str, port: str) -> None:
        """A veth from ``ns`` (named ``iface``) into ``bridge`` of ``switch_ns``."""
        _run(
            "ip", "link", "add", iface, "netns", ns, "type", "veth",
            "peer", "name", port, "netns", switch_ns,
        )  # fmt: skip
        _run("ip", "-n", switch_ns, "link", "set", port, "master", bridge)
        self._link_up(switch_ns, port)
        self._link_up(ns, iface)

    def public_host(self, role: str) -> Node:
        """A host with a public address on the public segment."""
        ip = f"{PUBLIC_PREFIX}.{10 + len(self.public)}"
        ns = self._namespace(role)
        self._wire(ns, "eth0", self.inet, "br0", f"p{len(self.public)}")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        node = Node(ns, ip)
        self.public.append(node)
        return node

    def home(self, *, symmetric: bool = False) -> Home:
        """A router on the public segment with an empty LAN behind it."""
        index = len(self.homes) + 1
        wan_ip = f"{PUBLIC_PREFIX}.{100 + index}"
        ns = self._namespace(f"r{index}")
        self._wire(ns, "wan", self.inet, "br0", f"r{index}")
        _run("ip", "-n", ns, "addr", "add", f"{wan_ip}/24", "dev", "wan")
        _run("ip", "-n", ns, "link", "add", "lan", "type", "bridge")
        _run("ip", "-n", ns, "link", "set", "lan", "type", "bridge", "mcast_snooping", "0")
        self._link_up(ns, "lan")
        _run("ip", "-n", ns, "addr", "add", f"10.{index}.0.1/24", "dev", "lan")
        router = Node(ns, wan_ip, "wan")
        router.sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = ["-j", "MASQUERADE"] + (["--random-fully"] if symmetric else [])
        rules = [
            ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", *masquerade],
            ["-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW,INVALID",
             "-j", "DROP"],
            ["-A", "FORWARD", "-i", "wan", "-m", "conntrack", "--ctstate",
             "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", "wan", "-j", "DROP"],
        ]  # fmt: skip
        for rule in rules:
            router.sh("iptables", *rule)
        home = Home(index, router, symmetric)
        self.homes.append(home)
        return home

    def lan_host(self, home: Home) -> Node:
        """A host on ``home``'s LAN, its default route through the router."""
        j = len(home.hosts)
        ip = f"{home.lan_prefix}.{10 + j}"
        ns = self._namespace(f"h{home.index}{chr(ord('a') + j)}")
        self._wire(ns, "eth0", home.router.ns, "lan", f"l{j}")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "-n", ns, "route", "add", "default", "via", f"{home.lan_prefix}.1")
        node = Node(ns, ip)
        home.hosts.append(node)
        return node

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            _live.discard(ns)
        self._namespaces.clear()
