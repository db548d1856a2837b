"""DHT messages and their msgpack-ready wire form, sans-IO.

A request is a map ``{"op": ..., ...}``; a node in server mode adds ``"from"``, the
binary multiaddrs it listens on, and ``"pow"``, its identity proof-of-work nonce (a
client leaves both out and never enters routing tables). Replies carry ``"pow"`` (the
answering node's nonce: only a proven node takes part in lookups), ``"peers"``
(``[peer id bytes, [multiaddr bytes, ...]]``), the ``"entries"`` found (``[sub-key or
nil, value, expiry, signature, owner's pow nonce]``; a four-field entry has no nonce),
the per-entry ``"codes"`` of a store, or ``"refused"`` with a ``RefusalCode`` and a
message.

Every decoder checks types and bounds and raises ``DhtProtocolError``: a peer's
malformed message never becomes another exception on our side.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from security import MAX_NONCE_BYTES, InvalidPeerId, PeerId
from transport import Multiaddr, MultiaddrError

from ._contact import Contact
from ._errors import DhtProtocolError, RefusalCode
from ._ids import id_from_bytes, id_to_bytes
from ._limits import DhtLimits
from ._records import Entry

PROTOCOL_ID = "/swarm/dht/1.0.0"


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class FindNode:
    target: int


@dataclass(frozen=True, slots=True)
class FindValue:
    key: bytes


@dataclass(frozen=True, slots=True)
class Store:
    key: bytes
    entries: tuple[Entry, ...]


Request = Ping | FindNode | FindValue | Store


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer: contacts, entries found, per-entry store codes, or a refusal.

    ``proof`` is the answering node's identity proof-of-work nonce.
    """

    peers: tuple[Contact, ...] = ()
    entries: tuple[Entry, ...] = ()
    codes: tuple[RefusalCode, ...] = ()
    refused: RefusalCode = RefusalCode.OK
    message: str = ""
    proof: bytes = b""


@dataclass(frozen=True, slots=True)
class Inbound:
    """A decoded request and what its sender says of itself: the raw ``addrs`` it listens
    on (None: a client) and its identity ``proof`` nonce."""

    request: Request
    addrs: Any
    proof: bytes


def encode_request(
    request: Request, own_addrs: tuple[Multiaddr, ...] | None, proof: bytes = b""
) -> dict[str, Any]:
    """The wire map of ``request``; ``own_addrs`` None means we are a client (and then
    ``proof``, our identity proof-of-work nonce, is left out too)."""
    match request:
        case Ping():
            message: dict[str, Any] = {"op": "ping"}
        case FindNode(target):
            message = {"op": "find_node", "id": id_to_bytes(target)}
        case FindValue(key):
            message = {"op": "find_value", "key": key}
        case Store(key, entries):
            message = {"op": "store", "key": key, "entries": [_entry_fields(e) for e in entries]}
    if own_addrs is not None:
        message["from"] = [a.to_bytes() for a in own_addrs]
        if proof:
            message["pow"] = proof
    return message


def _entry_fields(entry: Entry) -> list[Any]:
    return [entry.subkey, entry.value, entry.expiry, entry.signature, entry.proof]


def _bytes(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, bytes):
        raise DhtProtocolError(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) > limit:
        raise DhtProtocolError(f"{what} of {len(value)} bytes exceeds {limit}")
    return value


def _list(value: Any, what: str, limit: int) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise DhtProtocolError(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise DhtProtocolError(f"{what} has {len(value)} items, over the limit of {limit}")
    return list(value)


def _entries(key: bytes, value: Any, limits: DhtLimits) -> tuple[Entry, ...]:
    entries = []
    for item in _list(value, "entries", limits.max_entries_per_message):
        fields = _list(item, "entry", 5)
        if len(fields) not in (4, 5):
            raise DhtProtocolError("an entry is [sub-key, value, expiry, signature, pow nonce]")
        subkey, data, expiry, signature = fields[:4]
        proof = _bytes(fields[4], "pow nonce", MAX_NONCE_BYTES) if len(fields) == 5 else b""
        if subkey is not None:
            subkey = _bytes(subkey, "sub-key", limits.max_message_bytes)
        if not isinstance(expiry, float | int) or isinstance(expiry, bool):
            raise DhtProtocolError(f"expiry must be a number, got {type(expiry).__name__}")
        if not math.isfinite(expiry):
            raise DhtProtocolError(f"expiry must be a finite time, got {expiry}")
        entries.append(
            Entry(
                key,
                subkey,
                _bytes(data, "value", limits.max_message_bytes),
                float(expiry),
                _bytes(signature, "signature", 1024),
                proof,
            )
        )
    return tuple(entries)


def _proof(message: dict[Any, Any]) -> bytes:
    return _bytes(message.get("pow", b""), "pow nonce", MAX_NONCE_BYTES)


def encode_reply(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {}
    if reply.refused is not RefusalCode.OK:
        return {"refused": int(reply.refused), "message": reply.message}
    if reply.proof:
        message["pow"] = reply.proof
    if reply.peers:
        message["peers"] = [
            [c.peer_id.to_bytes(), [a.to_bytes() for a in c.addrs]] for c in reply.peers
        ]
    if reply.entries:
        message["entries"] = [_entry_fields(e) for e in reply.entries]
    if reply.codes:
        message["codes"] = [int(c) for c in reply.codes]
    return message


def _code(value: Any) -> RefusalCode:
    try:
        return RefusalCode(value)
    except ValueError:
        raise DhtProtocolError(f"unknown refusal code {value!r}") from None


class Codec:
    """Decodes requests and replies of one node, checking every type and bound.

    Contacts recur in almost every reply, so parsed ones are kept in a bounded cache
    keyed by their wire bytes: a known contact costs one dictionary lookup, not a
    multiaddr parse and a SHA-256.
    """

    def __init__(self, limits: DhtLimits) -> None:
        self.limits = limits
        self._contacts: OrderedDict[tuple[Any, ...], Contact] = OrderedDict()

    def contact(self, peer: Any, addrs: Any, ip: str | None = None) -> Contact:
        """The contact for wire fields ``peer`` (PeerID bytes) and ``addrs`` (multiaddr bytes)."""
        raw = tuple(_list(addrs, "address list", self.limits.max_addrs_per_peer))
        cache_key = (peer, raw, ip)
        try:
            known = self._contacts.get(cache_key)
        except TypeError:
            raise DhtProtocolError("a peer's fields must be bytes") from None
        if known is not None:
            self._contacts.move_to_end(cache_key)
            return known
        try:
            peer_id = PeerId.from_bytes(_bytes(peer, "peer id", 128))
            parsed = tuple(Multiaddr.from_bytes(_bytes(a, "address", 1024)) for a in raw)
        except InvalidPeerId as exc:
            raise DhtProtocolError(f"bad peer id: {exc}") from None
        except MultiaddrError as exc:
            raise DhtProtocolError(f"bad address: {exc}") from None
        contact = self._contacts[cache_key] = Contact(peer_id, parsed, ip)
        if len(self._contacts) > self.limits.contact_cache_size:
            self._contacts.popitem(last=False)
        return contact

    def decode_request(self, message: Any) -> Inbound:
        """Parse a request map: the request, the sender's raw addresses (None: a client)
        and its proof-of-work nonce.

        The addresses are checked when the caller makes a contact of them (``contact``).
        """
        limits = self.limits
        if not isinstance(message, dict):
            raise DhtProtocolError(f"a DHT request is a map, got {type(message).__name__}")
        op = message.get("op")
        request: Request
        if op == "ping":
            request = Ping()
        elif op == "find_node":
            request = FindNode(id_from_bytes(message.get("id")))
        elif op == "find_value":
            request = FindValue(_bytes(message.get("key"), "key", limits.max_key_bytes))
        elif op == "store":
            key = _bytes(message.get("key"), "key", limits.max_key_bytes)
            request = Store(key, _entries(key, message.get("entries"), limits))
        else:
            raise DhtProtocolError(f"unknown DHT operation {op!r}")
        return Inbound(request, message.get("from"), _proof(message))

    def decode_reply(self, message: Any, *, key: bytes = b"") -> Reply:
        """Parse a reply map; ``key`` is the key asked for (entries travel without it)."""
        limits = self.limits
        if not isinstance(message, dict):
            raise DhtProtocolError(f"a DHT reply is a map, got {type(message).__name__}")
        if "refused" in message:
            text = message.get("message", "")
            return Reply(refused=_code(message["refused"]), message=str(text)[:1024])
        peers = []
        listed = _list(message.get("peers", []), "peers", limits.max_entries_per_message)
        for item in listed[: limits.k]:
            fields = _list(item, "peer", 2)
            if len(fields) != 2:
                raise DhtProtocolError("a peer is [peer id, addresses]")
            peers.append(self.contact(fields[0], fields[1]))
        entries = _entries(key, message.get("entries", []), limits)
        codes = _list(message.get("codes", []), "codes", limits.max_entries_per_message)
        codes_ = tuple(_code(c) for c in codes)
        return Reply(tuple(peers), entries, codes_, proof=_proof(message))
