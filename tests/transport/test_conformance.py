"""Runs the transport conformance suite (``conformance.py``) over every transport.

Adding a transport is one line in ``CASES``.
"""

from __future__ import annotations

from functools import partial

import pytest

from tests.transport.conformance import TransportCase, TransportConformance, TransportMaker
from transport._limits import QuicLimits, TransportLimits
from transport._memory import MemoryHub, MemoryTransport
from transport._quic import QuicTransport
from transport._tcp import TcpTransport


def memory_world() -> TransportMaker:
    hub = MemoryHub()
    return lambda identity: MemoryTransport(identity, hub=hub)


CASES = [
    TransportCase("memory", "/memory/0", memory_world),
    TransportCase(
        "quic", "/ip4/127.0.0.1/udp/0/quic-v1", lambda: partial(QuicTransport, limits=QuicLimits())
    ),
    TransportCase(
        "tcp", "/ip4/127.0.0.1/tcp/0", lambda: partial(TcpTransport, limits=TransportLimits())
    ),
]


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def transport_case(request: pytest.FixtureRequest) -> TransportCase:
    return request.param


class TestTransportConformance(TransportConformance):
    pass
