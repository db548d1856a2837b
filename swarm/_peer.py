"""What every command needs: an identity, a Host with TCP and QUIC, a DHT, and a clean stop.

``start_peer`` can also run NAT traversal (``p2p.NatTraversal``: reachability check,
relays, hole punching) and mDNS discovery on the LAN (``p2p.MdnsDiscovery``). mDNS runs
only on the private LAN addresses (10/8, 172.16/12, 192.168/16) among the addresses the
node listens on: a node listening on loopback (the default) multicasts nowhere, one
listening on ``0.0.0.0`` announces itself on its LAN interfaces. Peers found by mDNS
become DHT bootstrap peers, so a home cluster started with no ``--bootstrap`` forms one
swarm by itself, and a node given a public bootstrap as well joins both.

Imports no torch: ``bootstrap`` runs on the core packages alone.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from dht import DHT, DHTError, DhtLimits, NotBootstrapped, RefusalCode
from p2p import Host, NatTraversal, P2PError, Reachability
from p2p.discovery import MdnsDiscovery, OnPeer, PeerFound, connect_to_found, lan_interfaces
from security import IdentityProof, KeyPair, ReputationBook, proof_bits
from transport import Multiaddr, QuicTransport, TcpTransport, link_delay_from_env

_log = logging.getLogger("swarm.peer")

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1")
"""Loopback only by default: pass ``--listen`` with a LAN or public address to be reachable."""

DEFAULT_POW_BITS = DhtLimits().pow_difficulty
"""The identity proof-of-work difficulty of a swarm, unless ``--pow-bits`` says otherwise."""
PROOF_SUFFIX = ".pow"
"""The identity proof is kept beside the key file, in ``<key file>.pow``."""
REPUTATION_FILE = "reputation.msgpack"
"""The reputation book's file in the swarm cache."""


class _Service(Protocol):
    async def stop(self) -> None: ...


_services: dict[Host, list[_Service]] = {}
"""What ``start_peer`` started beside each Host (NAT traversal, mDNS), for ``stop_peer``."""


@dataclasses.dataclass
class _Kept:
    """What a node keeps across restarts: its identity proof and its reputation book."""

    proof_file: Path | None
    saved_proof: IdentityProof | None
    book: ReputationBook | None
    book_file: Path | None

    def keep_proof(self, dht: DHT) -> None:
        """Save the DHT's identity proof in ``proof_file`` unless it is there already."""
        proof = dht.identity_proof
        if self.proof_file is None or proof is None or proof == self.saved_proof:
            return
        save_proof(self.proof_file, proof)
        self.saved_proof = proof
        _log.info("identity proof-of-work saved in %s", self.proof_file)

    def save(self, dht: DHT) -> None:
        self.keep_proof(dht)
        if self.book is not None and self.book_file is not None:
            self.book.save(self.book_file)
            _log.info("reputation of %d peers saved in %s", len(self.book), self.book_file)


_kept: dict[Host, _Kept] = {}
"""What ``stop_peer`` saves for each Host ``start_peer`` started."""


def say(text: str) -> None:
    """One line on stdout, flushed: what scripts (and the demo) read."""
    print(text, flush=True)


def identity_from(path: str | None) -> KeyPair:
    """The key pair in ``path`` (created, mode 0600, if missing), or a fresh one."""
    return KeyPair.load_or_create(path) if path else KeyPair.generate()


def default_cache_dir() -> Path:
    """``$SWARM_CACHE_DIR``, else ``~/.cache/swarm``."""
    return Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm"))


def proof_file_for(identity_path: str | None) -> Path | None:
    """Where the identity proof of the key in ``identity_path`` is kept (None: no key file)."""
    return Path(f"{identity_path}{PROOF_SUFFIX}") if identity_path else None


def reputation_file_in(cache_dir: Path | None) -> Path:
    """The reputation book's file in ``cache_dir`` (default: ``default_cache_dir()``)."""
    return (cache_dir or default_cache_dir()) / REPUTATION_FILE


def load_proof(path: Path, identity: KeyPair, difficulty: int) -> IdentityProof | None:
    """The proof kept in ``path`` if it holds for ``identity`` at ``difficulty`` bits; None
    when there is none, or it is damaged, another key's, or weaker (the DHT solves anew)."""
    try:
        text = path.read_text(encoding="ascii").strip()
        nonce = bytes.fromhex(text)
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError):
        _log.warning("identity proof file %s is damaged: solving a new proof", path)
        return None
    bits = proof_bits(identity.peer_id.public_key(), nonce) if nonce else 0
    if not nonce or bits < difficulty:
        _log.info(
            "the identity proof in %s has %d bits for this key, the swarm asks for %d: "
            "solving a new one",
            path,
            bits,
            difficulty,
        )
        return None
    _log.info("identity proof-of-work reused from %s (%d bits)", path, bits)
    return IdentityProof(nonce)


def save_proof(path: Path, proof: IdentityProof) -> None:
    """Write ``proof`` to ``path`` atomically (a temporary file, then a rename), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{proof.nonce.hex()}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def addrs_from(texts: Sequence[str]) -> list[Multiaddr]:
    return [Multiaddr.from_string(text) for text in texts]


async def start_node(args: argparse.Namespace) -> tuple[Host, DHT]:
    """``start_peer`` for ``join`` and ``bootstrap``: a DHT server with NAT traversal, from
    the options they share (``--identity``, ``--listen``, ``--bootstrap``, ``--no-mdns``,
    ``--pow-bits``, ``--cache-dir``)."""
    return await start_peer(
        identity_from(args.identity),
        args.listen or DEFAULT_LISTEN,
        args.bootstrap,
        server_mode=True,
        nat=True,
        mdns=not args.no_mdns,
        pow_bits=args.pow_bits,
        proof_file=proof_file_for(args.identity),
        reputation_file=reputation_file_in(args.cache_dir),
    )


async def start_peer(
    identity: KeyPair,
    listen: Sequence[str],
    bootstrap: Sequence[str],
    *,
    server_mode: bool,
    nat: bool = False,
    mdns: bool = False,
    pow_bits: int = DEFAULT_POW_BITS,
    proof_file: Path | None = None,
    reputation_file: Path | None = None,
) -> tuple[Host, DHT]:
    """A started Host (listening on ``listen``) and a DHT joined through ``bootstrap``.

    With no ``bootstrap`` the DHT starts a new swarm. ``nat`` runs NAT traversal: with
    ``server_mode`` and a bootstrap, the reachability check runs first and a peer found
    unreachable joins the DHT as a client (it stays reachable for blocks through its
    relay). ``mdns`` runs LAN discovery where the node listens on a LAN address.
    ``pow_bits``, ``proof_file`` and ``reputation_file``: see the module's docstring.
    The book kept in ``reputation_file`` hears how every DHT request to a peer ends
    (``on_outcome``) and ranks the routing table (``score``); ``reputation_book(host)``
    returns it while the node runs, ``stop_peer`` saves it.
    """
    book = ReputationBook.load(reputation_file) if reputation_file is not None else None
    proof = load_proof(proof_file, identity, pow_bits) if proof_file is not None else None
    kept = _Kept(proof_file, proof, book, reputation_file)
    host = Host(identity, link_delay_from_env([TcpTransport(identity), QuicTransport(identity)]))
    await host.start(addrs_from(listen))
    services: list[_Service] = []
    _services[host] = services
    try:
        if nat:
            traversal = NatTraversal(host, identity)
            await traversal.start()
            services.append(traversal)
            if server_mode and bootstrap:
                server_mode = await _reachable(host, traversal, addrs_from(bootstrap))
        dht = DHT(
            host,
            dataclasses.replace(DhtLimits(), pow_difficulty=pow_bits),
            server_mode=server_mode,
            identity=identity,
            proof=proof,
            score=book.contact_score if book is not None else None,
            on_outcome=book.record_outcome if book is not None else None,
        )
        await _start_dht(dht, addrs_from(bootstrap))
        kept.keep_proof(dht)
        _kept[host] = kept
        if mdns:
            await _start_mdns(host, dht, services)
    except BaseException:
        _kept.pop(host, None)
        await _stop_services(host)
        await host.stop()
        raise
    return host, dht


def reputation_book(host: Host) -> ReputationBook | None:
    """The reputation book of a node ``start_peer`` started with a ``reputation_file``."""
    kept = _kept.get(host)
    return None if kept is None else kept.book


async def _start_dht(dht: DHT, bootstrap: list[Multiaddr]) -> None:
    """Start ``dht`` (solving its proof-of-work first if it has none); stopped on failure."""
    bits = dht.limits.pow_difficulty
    if dht.server_mode and dht.identity_proof is None:
        _log.info("solving an identity proof-of-work of %d bits", bits)
    try:
        await dht.start(bootstrap=bootstrap)
    except NotBootstrapped as exc:
        await dht.stop()
        if RefusalCode.INSUFFICIENT_POW.name not in str(exc):
            raise
        raise NotBootstrapped(
            f"{exc}. Every node of a swarm must use the same --pow-bits: this node uses "
            f"{bits}, ask the swarm's operators for theirs"
        ) from None
    except BaseException:
        await dht.stop()
        raise


async def _reachable(host: Host, traversal: NatTraversal, bootstrap: list[Multiaddr]) -> bool:
    """Connect to the bootstrap peers and check reachability: False only when unreachable."""
    results = await asyncio.gather(
        *(_identified(host, a) for a in bootstrap), return_exceptions=True
    )
    for addr, result in zip(bootstrap, results, strict=True):
        if isinstance(result, P2PError):
            _log.info("bootstrap peer %s not reached yet: %s", addr, result)
        elif isinstance(result, BaseException):
            raise result
    status = await traversal.settle()
    if status is Reachability.PRIVATE:
        _log.warning(
            "this node cannot be reached from the internet: it joins the DHT as a client and "
            "is reached through a relay (see docs/networking.md to open a port instead)"
        )
    return status is not Reachability.PRIVATE


async def _identified(host: Host, addr: Multiaddr) -> None:
    """Connect to ``addr`` and learn what its peer serves (identify)."""
    await host.identify(await host.connect(addr))


async def _start_mdns(host: Host, dht: DHT, services: list[_Service]) -> None:
    interfaces = lan_interfaces(host.listen_addrs)
    if not interfaces:
        _log.info("mDNS off: this node listens on no private LAN address")
        return
    discovery = MdnsDiscovery(host, interfaces=interfaces, on_peer=_join_found(host, dht))
    await discovery.start()
    services.insert(0, discovery)
    _log.info("mDNS on %s", ", ".join(interfaces))


def _join_found(host: Host, dht: DHT) -> OnPeer:
    """Connect to a peer mDNS found and, if the DHT does not know it, bootstrap from it."""
    connect = connect_to_found(host)

    async def on_peer(found: PeerFound) -> None:
        _log.info("LAN peer %s found by mDNS", found.peer_id)
        await connect(found)
        if not host.connections(found.peer_id) or found.peer_id in dht.routing_table:
            return
        try:
            await dht.bootstrap([found.addrs[0].with_p2p(found.peer_id)])
        except DHTError as exc:
            _log.info("LAN peer %s did not answer as a DHT node: %s", found.peer_id, exc)

    return on_peer


async def _stop_services(host: Host) -> None:
    for service in _services.pop(host, []):
        await service.stop()


async def stop_peer(host: Host, dht: DHT) -> None:
    """Stop what ``start_peer`` started, then save what the node keeps across restarts."""
    await _stop_services(host)
    await dht.stop()
    await host.stop()
    kept = _kept.pop(host, None)
    if kept is not None:
        kept.save(dht)


def stop_signal() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM; a second one interrupts at once."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def first(signum: int) -> None:
        event.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print(f"{signal.Signals(signum).name}: stopping (again to force)", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first, sig)
    return event
