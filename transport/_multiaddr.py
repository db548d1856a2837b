"""Multiaddrs: self-describing network addresses, in text and binary form.

Follows the multiformats multiaddr spec. The text form is ``/<name>/<value>/...``; the
binary form is, per component, the protocol's uvarint code followed by its value:
4 bytes for ``ip4``, 16 for ``ip6``, 2 (big-endian) for ``tcp``/``udp`` ports, nothing
for ``quic-v1`` and ``p2p-circuit``, and a uvarint length prefix before variable values.

Supported protocols (codes from the multicodec table):

==============  ======  =====================================================
name            code    value
==============  ======  =====================================================
``ip4``         0x04    dotted quad
``tcp``         0x06    port 0..65535
``dns``         0x35    domain name (parsed, never resolved here)
``dns4``        0x36    domain name
``dns6``        0x37    domain name
``ip6``         0x29    IPv6 address without zone
``udp``         0x0111  port 0..65535
``p2p-circuit`` 0x0122  none
``p2p``         0x01a5  PeerID multihash; text base58btc, ``/ipfs/`` accepted as alias
``quic-v1``     0x01cd  none (RFC 9000 QUIC; 0x01cc is the retired draft-29 ``/quic``)
``memory``      0x0309  a name: UTF-8, length-prefixed in binary (Swarm's in-process
                        transport; the multicodec table marks the value variable)
==============  ======  =====================================================

A ``Multiaddr`` is a frozen value: equal addresses compare and hash equal however they
were written (``/ip6/0:0::1`` and ``/ip6/::1`` are one address), because every value is
kept in its canonical text form.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from security import InvalidPeerId, PeerId, b58decode, b58encode

from ._errors import MultiaddrError, RemoteProtocolError
from ._varint import decode_uvarint, encode_uvarint

Component = tuple[str, str | None]

_PORT = re.compile(r"[0-9]{1,5}")
_VARIABLE = -1


@dataclass(frozen=True, slots=True)
class _Protocol:
    name: str
    code: int
    size: int
    """Bytes of a fixed-size value, 0 for none, ``_VARIABLE`` for a length-prefixed one."""
    encode: Callable[[str], bytes] | None
    decode: Callable[[bytes], str] | None


def _encode_ip4(text: str) -> bytes:
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        raise MultiaddrError(f"{text!r} is not an IPv4 address") from None


def _decode_ip4(value: bytes) -> str:
    return str(ipaddress.IPv4Address(value))


def _encode_ip6(text: str) -> bytes:
    if "%" in text:
        raise MultiaddrError(f"IPv6 address {text!r} has a zone; zones are not supported")
    try:
        return ipaddress.IPv6Address(text).packed
    except ValueError:
        raise MultiaddrError(f"{text!r} is not an IPv6 address") from None


def _decode_ip6(value: bytes) -> str:
    return str(ipaddress.IPv6Address(value))


def _encode_port(text: str) -> bytes:
    if not _PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise MultiaddrError(f"{text!r} is not a port number (0..65535)")
    return int(text).to_bytes(2, "big")


def _decode_port(value: bytes) -> str:
    return str(int.from_bytes(value, "big"))


def _encode_name(text: str) -> bytes:
    if not text or "/" in text:
        raise MultiaddrError(f"name value {text!r} is empty or contains '/'")
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise MultiaddrError(f"name value {text!r} cannot be encoded as UTF-8") from None


def _decode_name(value: bytes) -> str:
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise MultiaddrError(f"name value {value[:32]!r} is not UTF-8") from None
    if not text or "/" in text:
        raise MultiaddrError(f"name value {text!r} is empty or contains '/'")
    return text


def _check_multihash(value: bytes) -> None:
    try:
        code = decode_uvarint(value)
        digest = decode_uvarint(value, code[1]) if code is not None else None
    except RemoteProtocolError as exc:
        raise MultiaddrError(f"PeerID multihash {value.hex()}: {exc}") from None
    if code is None or digest is None or code[1] + digest[1] + digest[0] != len(value):
        raise MultiaddrError(
            f"PeerID {value.hex()} is not a multihash (code, digest length, digest)"
        )


def _encode_p2p(text: str) -> bytes:
    try:
        value = b58decode(text)
    except ValueError as exc:
        raise MultiaddrError(f"PeerID {text!r} is not base58btc: {exc}") from None
    _check_multihash(value)
    return value


def _decode_p2p(value: bytes) -> str:
    _check_multihash(value)
    return b58encode(value)


_PROTOCOLS = (
    _Protocol("ip4", 0x04, 4, _encode_ip4, _decode_ip4),
    _Protocol("tcp", 0x06, 2, _encode_port, _decode_port),
    _Protocol("dns", 0x35, _VARIABLE, _encode_name, _decode_name),
    _Protocol("dns4", 0x36, _VARIABLE, _encode_name, _decode_name),
    _Protocol("dns6", 0x37, _VARIABLE, _encode_name, _decode_name),
    _Protocol("ip6", 0x29, 16, _encode_ip6, _decode_ip6),
    _Protocol("udp", 0x0111, 2, _encode_port, _decode_port),
    _Protocol("p2p-circuit", 0x0122, 0, None, None),
    _Protocol("p2p", 0x01A5, _VARIABLE, _encode_p2p, _decode_p2p),
    _Protocol("quic-v1", 0x01CD, 0, None, None),
    _Protocol("memory", 0x0309, _VARIABLE, _encode_name, _decode_name),
)
_BY_NAME = {p.name: p for p in _PROTOCOLS}
_BY_NAME["ipfs"] = _BY_NAME["p2p"]
_BY_CODE = {p.code: p for p in _PROTOCOLS}
_IP_HOSTS = ("ip4", "ip6")
_Item = tuple[_Protocol, bytes | None]


def _parse_text(text: str) -> list[_Item]:
    if not text.startswith("/"):
        raise MultiaddrError("a multiaddr starts with '/'")
    parts = text[1:].split("/")
    if parts[-1] == "":
        parts.pop()
    if not parts:
        raise MultiaddrError("a multiaddr has at least one component")
    items: list[_Item] = []
    pos = 0
    while pos < len(parts):
        name = parts[pos]
        pos += 1
        proto = _BY_NAME.get(name)
        if proto is None:
            raise MultiaddrError(f"unknown protocol {name!r}" if name else "empty component '//'")
        if proto.encode is None:
            items.append((proto, None))
            continue
        if pos == len(parts):
            raise MultiaddrError(f"/{name} needs a value")
        items.append((proto, proto.encode(parts[pos])))
        pos += 1
    return items


def _read_uvarint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    try:
        decoded = decode_uvarint(data, pos)
    except RemoteProtocolError as exc:
        raise MultiaddrError(f"{what} at byte {pos}: {exc}") from None
    if decoded is None:
        raise MultiaddrError(f"{what} at byte {pos} is truncated")
    return decoded


def _parse_bytes(data: bytes) -> list[_Item]:
    if not data:
        raise MultiaddrError("a multiaddr has at least one component")
    items: list[_Item] = []
    pos = 0
    while pos < len(data):
        code, used = _read_uvarint(data, pos, "protocol code")
        proto = _BY_CODE.get(code)
        if proto is None:
            raise MultiaddrError(f"unknown protocol code {code:#x} at byte {pos}")
        pos += used
        if proto.encode is None:
            items.append((proto, None))
            continue
        size = proto.size
        if size == _VARIABLE:
            size, used = _read_uvarint(data, pos, f"length of /{proto.name}")
            pos += used
        if pos + size > len(data):
            raise MultiaddrError(
                f"/{proto.name} value needs {size} bytes at byte {pos}, "
                f"only {len(data) - pos} remain"
            )
        items.append((proto, data[pos : pos + size]))
        pos += size
    return items


def _items_of(components: tuple[Component, ...]) -> list[_Item]:
    items: list[_Item] = []
    for name, value in components:
        proto = _BY_NAME[name]
        if (value is None) != (proto.encode is None):
            raise MultiaddrError(f"/{name} takes {'no' if value is not None else 'a'} value")
        items.append((proto, None if proto.encode is None else proto.encode(value)))
    return items


def _host_protocol(host: str) -> str:
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise MultiaddrError(f"{host!r} is not an IPv4 or IPv6 address") from None
    return "ip4" if version == 4 else "ip6"


@dataclass(frozen=True, slots=True)
class Multiaddr:
    """A parsed multiaddr; build one with ``from_string``, ``from_bytes`` or ``for_*``."""

    components: tuple[Component, ...]
    """``(protocol name, canonical text value or None)`` per component, in order."""
    _packed: bytes = field(repr=False, compare=False)

    @classmethod
    def _assemble(cls, items: list[_Item]) -> Multiaddr:
        packed = bytearray()
        components: list[Component] = []
        for proto, raw in items:
            packed += encode_uvarint(proto.code)
            if raw is None or proto.decode is None:
                components.append((proto.name, None))
                continue
            if proto.size == _VARIABLE:
                packed += encode_uvarint(len(raw))
            packed += raw
            components.append((proto.name, proto.decode(raw)))
        return cls(tuple(components), bytes(packed))

    @classmethod
    def _of(cls, components: tuple[Component, ...]) -> Multiaddr:
        return cls._assemble(_items_of(components))

    @classmethod
    def from_string(cls, text: str) -> Multiaddr:
        try:
            return cls._assemble(_parse_text(text))
        except MultiaddrError as exc:
            raise MultiaddrError(f"invalid multiaddr {text!r}: {exc}") from None

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Multiaddr:
        raw = bytes(data)
        try:
            return cls._assemble(_parse_bytes(raw))
        except MultiaddrError as exc:
            shown = raw[:64].hex() + ("..." if len(raw) > 64 else "")
            raise MultiaddrError(f"invalid binary multiaddr {shown}: {exc}") from None

    @classmethod
    def for_quic(cls, host: str, port: int) -> Multiaddr:
        """``/ip4|ip6/<host>/udp/<port>/quic-v1``."""
        return cls._of(((_host_protocol(host), host), ("udp", str(port)), ("quic-v1", None)))

    @classmethod
    def for_tcp(cls, host: str, port: int) -> Multiaddr:
        """``/ip4|ip6/<host>/tcp/<port>``."""
        return cls._of(((_host_protocol(host), host), ("tcp", str(port))))

    @classmethod
    def for_memory(cls, name: str) -> Multiaddr:
        """``/memory/<name>``; the name is any non-empty text without '/'."""
        if "/" in name:
            raise MultiaddrError(f"memory name {name!r} contains '/'")
        return cls._of((("memory", name),))

    def to_bytes(self) -> bytes:
        return self._packed

    def value_for(self, name: str) -> str | None:
        """The value of the first ``name`` component, or None if there is none."""
        for proto, value in self.components:
            if proto == name:
                return value
        return None

    @property
    def peer_id(self) -> PeerId | None:
        """The PeerID of the last ``/p2p/`` component, or None without one.

        Raises ``MultiaddrError`` when that PeerID is a valid multihash but not an
        Ed25519 identity, the only kind Swarm supports.
        """
        for proto, value in reversed(self.components):
            if proto == "p2p" and value is not None:
                try:
                    return PeerId.from_base58(value)
                except InvalidPeerId as exc:
                    raise MultiaddrError(f"{self}: {exc}") from None
        return None

    def without_p2p(self) -> Multiaddr:
        """This address without a trailing ``/p2p/<id>`` (relay hops are kept)."""
        if self.components[-1][0] != "p2p":
            return self
        if len(self.components) == 1:
            raise MultiaddrError(f"{self} is nothing but a PeerID; it has no address to keep")
        return Multiaddr._of(self.components[:-1])

    def with_p2p(self, peer_id: PeerId) -> Multiaddr:
        """This address ending in ``/p2p/<peer_id>`` (replacing a trailing one)."""
        base = self.components[:-1] if self.components[-1][0] == "p2p" else self.components
        return Multiaddr._of((*base, ("p2p", str(peer_id))))

    def encapsulate(self, other: Multiaddr) -> Multiaddr:
        """``other`` appended to this address."""
        return Multiaddr(self.components + other.components, self._packed + other._packed)

    def host_port(self) -> tuple[str, int]:
        """The IP host and TCP/UDP port this address starts with."""
        if (
            len(self.components) < 2
            or self.components[0][0] not in _IP_HOSTS
            or self.components[1][0] not in ("tcp", "udp")
        ):
            raise MultiaddrError(f"{self} does not start with /ip4|ip6/<host>/tcp|udp/<port>")
        (_, host), (_, port) = self.components[:2]
        assert host is not None and port is not None
        return host, int(port)

    @property
    def transport_kind(self) -> Literal["quic", "tcp", "memory", "circuit"] | None:
        """Which transport dials this address; None for one no transport handles.

        ``/dns*`` addresses give None: they must be resolved to ``/ip4`` or ``/ip6`` first.
        """
        names = [proto for proto, _ in self.components]
        if "p2p-circuit" in names:
            return "circuit"
        if names[-1] == "p2p":
            names.pop()
        if names == ["memory"]:
            return "memory"
        if len(names) == 3 and names[0] in _IP_HOSTS and names[1:] == ["udp", "quic-v1"]:
            return "quic"
        if len(names) == 2 and names[0] in _IP_HOSTS and names[1] == "tcp":
            return "tcp"
        return None

    def __str__(self) -> str:
        return "".join(
            f"/{proto}" if value is None else f"/{proto}/{value}"
            for proto, value in self.components
        )

    def __repr__(self) -> str:
        return f"Multiaddr({str(self)!r})"
