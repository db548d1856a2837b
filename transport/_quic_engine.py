"""aioquic's sans-IO ``QuicConnection``, configured for libp2p (specs: quic/README.md, tls/tls.md).

Both sides present the certificate of ``security.make_tls_certificate`` and skip PKIX
(``verify_mode=CERT_NONE``): identity comes from the libp2p extension, which
:func:`authenticate` checks once aioquic reports the handshake complete.

aioquic has no public switch for a few things libp2p needs, so :class:`LibP2PQuicConnection`
reaches into its private state. Every such access is in this module, named and explained,
so that an aioquic upgrade has one place to check (written against aioquic 1.7).
"""

from __future__ import annotations

import ssl

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import Limit, QuicConnection, QuicConnectionState
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicProtocolVersion
from aioquic.tls import AlertDescription
from cryptography import x509

from security import (
    LIBP2P_ALPN,
    InvalidCertificate,
    PeerId,
    TlsCertificate,
    peer_id_from_certificate,
)

from ._limits import QuicLimits

CONNECTION_ID_BYTES = 8
"""Length of the connection IDs we issue; the demultiplexer parses short headers with it."""

SUPPORTED_VERSIONS = (QuicProtocolVersion.VERSION_1,)
"""``/quic-v1`` is RFC 9000 QUIC version 1, and nothing else."""

BAD_CERTIFICATE = QuicErrorCode.CRYPTO_ERROR + AlertDescription.bad_certificate
"""Transport error code for a rejected libp2p certificate (TLS alert 42 as a QUIC crypto error)."""

APPLICATION_NO_ERROR = 0
"""Application error code of an orderly connection close and of a stream reset."""


def quic_configuration(
    certificate: TlsCertificate, limits: QuicLimits, *, is_client: bool
) -> QuicConfiguration:
    """The aioquic configuration of one side; shared by all connections of that side."""
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[LIBP2P_ALPN],
        verify_mode=ssl.CERT_NONE,
        certificate=certificate.certificate,
        private_key=certificate.private_key,
        connection_id_length=CONNECTION_ID_BYTES,
        congestion_control_algorithm=limits.congestion_control,
        idle_timeout=limits.idle_timeout_s,
        max_data=limits.max_data_bytes,
        max_stream_data=limits.max_stream_data_bytes,
        max_datagram_size=limits.max_datagram_bytes,
        supported_versions=list(SUPPORTED_VERSIONS),
    )


class LibP2PQuicConnection(QuicConnection):
    """aioquic's connection with libp2p's handshake rules and a few read-outs of its state."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        max_streams: int,
        original_destination_connection_id: bytes | None = None,
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
        )
        # aioquic announces a fixed 128 bidirectional and 128 unidirectional streams. libp2p
        # uses bidirectional streams only: announce our limit for those and none of the other.
        self._local_max_streams_bidi = Limit(
            frame_type=QuicFrameType.MAX_STREAMS_BIDI, name="max_streams_bidi", value=max_streams
        )
        self._local_max_streams_uni = Limit(
            frame_type=QuicFrameType.MAX_STREAMS_UNI, name="max_streams_uni", value=0
        )

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # libp2p servers require the client's certificate; aioquic's TLS context only
            # sends a CertificateRequest when this private flag is set.
            self.tls._request_client_certificate = True

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented, once the handshake has received it."""
        return self.tls._peer_certificate

    @property
    def handshake_confirmed(self) -> bool:
        """True once the server's HANDSHAKE_DONE arrived (clients): the server accepted us."""
        return self._handshake_confirmed

    @property
    def accepted_initial(self) -> bool:
        """False while a server has not decrypted a single packet of the client."""
        return self._state is not QuicConnectionState.FIRSTFLIGHT

    @property
    def close_reason(self) -> ConnectionTerminated | None:
        """Why the connection is closing, as soon as either side started closing it.

        aioquic reports ``ConnectionTerminated`` only after the closing period (three
        probe timeouts); this lets the shell fail reads and writes at once.
        """
        return self._close_event

    @property
    def idle_timeout(self) -> float:
        """The negotiated idle timeout: the lower of both sides' (RFC 9000 10.1)."""
        return self._idle_timeout()

    def unacked_bytes(self, stream_id: int) -> int:
        """Bytes written to a stream that the peer has not acknowledged yet."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return stream.sender._buffer_stop - stream.sender._buffer_start


def authenticate(quic: LibP2PQuicConnection) -> PeerId:
    """The PeerID the peer's certificate proves; ``InvalidCertificate`` if it proves none."""
    certificate = quic.peer_certificate
    if certificate is None:
        raise InvalidCertificate("peer presented no certificate")
    return peer_id_from_certificate(certificate)
