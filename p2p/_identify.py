"""libp2p identify (``/ipfs/id/1.0.0``): the message, its codec and observed addresses.

The responder writes one uvarint-length-prefixed protobuf ``Identify`` message and
closes the stream::

    message Identify {
      optional bytes  publicKey       = 1;  // protobuf PublicKey
      repeated bytes  listenAddrs     = 2;  // binary multiaddrs
      repeated string protocols       = 3;
      optional bytes  observedAddr    = 4;  // the address the responder sees us at
      optional string protocolVersion = 5;  // "ipfs/0.1.0"
      optional string agentVersion    = 6;
    }

Unknown fields (``signedPeerRecord`` = 8, ...) are skipped, unparsable addresses are
dropped one by one, and a QUIC observed address reported as ``/tcp/<udp port>`` (as
py-libp2p does) is read as the QUIC address it means.
"""

from __future__ import annotations

from dataclasses import dataclass

from security import InvalidPeerId, PeerId
from transport._base import Stream
from transport._errors import MultiaddrError, RemoteProtocolError
from transport._limits import MultistreamLimits
from transport._multiaddr import Multiaddr
from transport._varint import decode_uvarint, encode_uvarint

from ._errors import PeerProtocolError
from ._frames import format_bytes
from ._limits import IdentifyLimits
from ._negotiate import Inbound, confirm_lazy
from ._protobuf import decode_fields, encode_fields

PROTOCOL_ID = "/ipfs/id/1.0.0"
PROTOCOL_VERSION = "ipfs/0.1.0"

_PUBLIC_KEY = 1
_LISTEN_ADDRS = 2
_PROTOCOLS = 3
_OBSERVED_ADDR = 4
_PROTOCOL_VERSION = 5
_AGENT_VERSION = 6
_IDENTITY_MULTIHASH = b"\x00"


@dataclass(frozen=True, slots=True)
class IdentifyInfo:
    """What a peer says about itself (and about how it sees us)."""

    peer_id: PeerId | None
    listen_addrs: tuple[Multiaddr, ...] = ()
    protocols: tuple[str, ...] = ()
    observed_addr: Multiaddr | None = None
    protocol_version: str = ""
    agent_version: str = ""


def _public_key_message(peer_id: PeerId) -> bytes:
    """The protobuf ``PublicKey`` an identity-multihash PeerID carries as its digest."""
    multihash = peer_id.to_bytes()
    code = decode_uvarint(multihash)
    assert code is not None
    length = decode_uvarint(multihash, code[1])
    assert length is not None
    return multihash[code[1] + length[1] :]


def _peer_id_of(public_key: bytes) -> PeerId:
    return PeerId.from_bytes(_IDENTITY_MULTIHASH + encode_uvarint(len(public_key)) + public_key)


def encode_identify(info: IdentifyInfo) -> bytes:
    """The protobuf message body (without the length prefix)."""
    fields: list[tuple[int, bytes | str]] = []
    if info.peer_id is not None:
        fields.append((_PUBLIC_KEY, _public_key_message(info.peer_id)))
    fields.extend((_LISTEN_ADDRS, addr.to_bytes()) for addr in info.listen_addrs)
    fields.extend((_PROTOCOLS, protocol) for protocol in info.protocols)
    if info.observed_addr is not None:
        fields.append((_OBSERVED_ADDR, info.observed_addr.to_bytes()))
    fields.append((_PROTOCOL_VERSION, info.protocol_version))
    fields.append((_AGENT_VERSION, info.agent_version))
    return encode_fields(fields)


def _text(value: int | bytes, name: str) -> str:
    if not isinstance(value, bytes):
        raise PeerProtocolError(f"identify field {name} is a varint, expected a string")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise PeerProtocolError(f"identify field {name} is not UTF-8") from None


def decode_identify(data: bytes) -> IdentifyInfo:
    """Parse an ``Identify`` message; raises ``PeerProtocolError`` when it is malformed."""
    peer_id: PeerId | None = None
    addrs: list[Multiaddr] = []
    protocols: list[str] = []
    observed: Multiaddr | None = None
    protocol_version = agent_version = ""
    for number, value in decode_fields(data):
        if number == _PUBLIC_KEY:
            if not isinstance(value, bytes):
                raise PeerProtocolError("identify publicKey is a varint, expected bytes")
            try:
                peer_id = _peer_id_of(value)
            except InvalidPeerId as exc:
                raise PeerProtocolError(f"identify publicKey: {exc}") from None
        elif number in (_LISTEN_ADDRS, _OBSERVED_ADDR) and isinstance(value, bytes):
            try:
                addr = Multiaddr.from_bytes(value)
            except MultiaddrError:
                continue
            if number == _LISTEN_ADDRS:
                addrs.append(addr)
            else:
                observed = addr
        elif number == _PROTOCOLS:
            protocols.append(_text(value, "protocols"))
        elif number == _PROTOCOL_VERSION:
            protocol_version = _text(value, "protocolVersion")
        elif number == _AGENT_VERSION:
            agent_version = _text(value, "agentVersion")
    return IdentifyInfo(
        peer_id, tuple(addrs), tuple(protocols), observed, protocol_version, agent_version
    )


def frame_identify(info: IdentifyInfo) -> bytes:
    """The message as sent on the wire: uvarint length, then the protobuf body."""
    body = encode_identify(info)
    return encode_uvarint(len(body)) + body


async def serve_identify(stream: Stream, inbound: Inbound, message: bytes) -> None:
    """Answer an identify request with ``message`` (from ``frame_identify``)."""
    await stream.write(inbound.answer + message)
    await stream.close()


async def request_identify(
    stream: Stream, prefix: bytes, negotiation: MultistreamLimits, limits: IdentifyLimits
) -> IdentifyInfo:
    """Ask for the remote's identify message on a fresh stream; the caller bounds the time."""
    await stream.write(prefix)
    data = bytearray(await confirm_lazy(stream, prefix, PROTOCOL_ID, negotiation))
    while True:
        try:
            decoded = decode_uvarint(data)
        except RemoteProtocolError as exc:
            raise PeerProtocolError(f"identify length prefix: {exc}") from None
        if decoded is not None:
            length, used = decoded
            if length > limits.max_message_bytes:
                raise PeerProtocolError(
                    f"identify message of {format_bytes(length)} exceeds "
                    f"IdentifyLimits.max_message_bytes={format_bytes(limits.max_message_bytes)}"
                )
            if len(data) >= used + length:
                return decode_identify(bytes(data[used : used + length]))
        chunk = await stream.read()
        if not chunk:
            raise PeerProtocolError(f"identify stream ended after {len(data)} bytes")
        data += chunk


def normalize_observed(addr: Multiaddr, transport_name: str) -> Multiaddr | None:
    """The address a peer observed us at, as one of our transports would listen on it.

    Drops ``/p2p/``; on a QUIC connection reads ``/ipX/<host>/tcp/<port>`` as
    ``/ipX/<host>/udp/<port>/quic-v1``; None when the address does not fit the
    connection's transport (nothing to learn from it).
    """
    if addr.components[-1][0] == "p2p":
        if len(addr.components) == 1:
            return None
        addr = addr.without_p2p()
    kind = addr.transport_kind
    if transport_name == "quic" and kind == "tcp":
        host, port = addr.host_port()
        return Multiaddr.for_quic(host, port)
    return addr if kind == transport_name else None


class ObservedAddrs:
    """Our addresses as other peers report them, each with its distinct reporters."""

    def __init__(self, limits: IdentifyLimits) -> None:
        self._limits = limits
        self._observers: dict[Multiaddr, set[PeerId]] = {}

    def record(self, observer: PeerId, addr: Multiaddr) -> None:
        observers = self._observers.get(addr)
        if observers is None:
            if len(self._observers) >= self._limits.max_observed_addrs:
                weakest = min(self._observers, key=lambda known: len(self._observers[known]))
                del self._observers[weakest]
            observers = self._observers[addr] = set()
        observers.add(observer)

    def counts(self) -> dict[Multiaddr, int]:
        """Each observed address and how many distinct peers reported it."""
        return {addr: len(observers) for addr, observers in self._observers.items()}

    def confirmed(self) -> list[Multiaddr]:
        """Addresses reported by at least ``IdentifyLimits.observed_confirmations`` peers."""
        need = self._limits.observed_confirmations
        return [addr for addr, observers in self._observers.items() if len(observers) >= need]
