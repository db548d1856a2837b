"""Make a server ``ssl.SSLContext`` demand a client certificate without PKIX checks.

libp2p peers present self-signed certificates (libp2p specs, tls/tls.md); identity comes
from the libp2p public-key extension, not from a certificate authority. Go's libp2p
asks for the client certificate with ``InsecureSkipVerify`` and checks it in
``VerifyPeerCertificate``. Python's ``ssl`` has no such switch: on a server,
``CERT_OPTIONAL``/``CERT_REQUIRED`` make OpenSSL verify the chain against trusted CAs
and reject every libp2p certificate (``TLSV1_ALERT_UNKNOWN_CA``).

:func:`request_any_peer_certificate` closes that gap with one OpenSSL call made through
ctypes: ``SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
accept_any)``. OpenSSL still demands a certificate and still checks the peer's
``CertificateVerify`` signature (proof that it holds the certificate's key); only the
chain-of-trust verdict is overridden. The caller then reads the certificate with
``SSLObject.getpeercert(binary_form=True)`` and verifies the libp2p extension itself
(``security.peer_id_from_certificate``). A client context needs none of this: with
``CERT_NONE`` it still receives the server's certificate.

Two assumptions, both checked once at first use:

- ``libssl`` is the library the ``_ssl`` extension is linked against, found in
  ``/proc/self/maps`` (or ``_ssl`` itself when OpenSSL is linked statically);
- the ``SSL_CTX *`` is the first field after ``PyObject_HEAD`` of CPython's
  ``PySSLContext`` (true for CPython 3.8 to 3.13). The check flips ``verify_mode``
  through Python on a probe context and reads it back through OpenSSL.

When either fails, :class:`~transport.HandshakeError` says so; the remedy is a CPython
build whose ``ssl`` module uses a shared or static OpenSSL on Linux.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import os
import ssl
import sys
from dataclasses import dataclass
from typing import Any

from ._errors import HandshakeError

_SSL_VERIFY_NONE = 0x00
_SSL_VERIFY_PEER = 0x01
_SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02

_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept_any(preverify_ok: int, store_ctx: int | None) -> int:
    return 1


_ACCEPT_ANY = _VerifyCallback(_accept_any)
"""Lives as long as the process: OpenSSL keeps only the function pointer."""


@dataclass(frozen=True, slots=True)
class _LibSsl:
    path: str
    set_verify: Any
    get_verify_mode: Any


def _mapped_libssl() -> str:
    """The libssl file mapped into this process, or ``_ssl`` itself if none is."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libssl."):
                    return fields[5].strip()
    except OSError as exc:
        raise HandshakeError(
            f"cannot read /proc/self/maps to find the libssl used by Python's ssl module: {exc}"
        ) from None
    return _ssl.__file__


def _context_pointer(context: ssl.SSLContext) -> int:
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        raise HandshakeError("ssl.SSLContext holds no SSL_CTX; cannot install the verify hook")
    return pointer


def _probe(lib: _LibSsl) -> None:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for mode, bits in ((ssl.CERT_OPTIONAL, _SSL_VERIFY_PEER), (ssl.CERT_NONE, _SSL_VERIFY_NONE)):
        probe.verify_mode = mode
        seen = lib.get_verify_mode(_context_pointer(probe))
        if seen != bits:
            raise HandshakeError(
                f"the SSL_CTX read from ssl.SSLContext does not match {lib.path} "
                f"(verify mode {seen:#x}, expected {bits:#x}); this Python's ssl layout is "
                "unsupported: use CPython 3.11-3.13 with its ssl module linked to OpenSSL"
            )


@functools.cache
def _bind() -> _LibSsl | HandshakeError:
    if sys.implementation.name != "cpython":
        return HandshakeError(
            f"TLS listeners need CPython to request client certificates, "
            f"not {sys.implementation.name}"
        )
    try:
        path = _mapped_libssl()
        library = ctypes.CDLL(path)
        set_verify = library.SSL_CTX_set_verify
        get_verify_mode = library.SSL_CTX_get_verify_mode
    except (OSError, AttributeError) as exc:
        return HandshakeError(
            f"cannot bind SSL_CTX_set_verify from the libssl of Python's ssl module: {exc}; "
            "install a CPython whose ssl module links OpenSSL (shared or static)"
        )
    except HandshakeError as exc:
        return exc
    set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VerifyCallback]
    set_verify.restype = None
    get_verify_mode.argtypes = [ctypes.c_void_p]
    get_verify_mode.restype = ctypes.c_int
    lib = _LibSsl(path=path, set_verify=set_verify, get_verify_mode=get_verify_mode)
    try:
        _probe(lib)
    except HandshakeError as exc:
        return exc
    return lib


def request_any_peer_certificate(context: ssl.SSLContext) -> None:
    """Make ``context`` require a peer certificate and accept any at the OpenSSL layer.

    Only for contexts whose handshakes are followed by a libp2p certificate check of
    ``getpeercert(binary_form=True)``. Raises ``HandshakeError`` when this Python cannot
    do it (see the module docstring).
    """
    lib = _bind()
    if isinstance(lib, HandshakeError):
        raise HandshakeError(str(lib))
    lib.set_verify(
        _context_pointer(context),
        _SSL_VERIFY_PEER | _SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
        _ACCEPT_ANY,
    )
    if context.verify_mode != ssl.CERT_REQUIRED:
        raise HandshakeError(
            f"SSL_CTX_set_verify from {lib.path} did not take effect "
            f"(verify_mode is {context.verify_mode!r}); this Python's ssl layout is unsupported"
        )
