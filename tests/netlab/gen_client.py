"""A generation client for the network lab, run as ``ip netns exec NS python gen_client.py``.

It joins the swarm through ``--bootstrap`` as a DHT client whose Host can dial relayed
servers and answer hole punches (``SwarmClient`` runs a ``Relay`` and a ``HolePuncher``),
generates ``--new-tokens`` tokens greedily after ``--ids`` with
``DistributedModelForCausalLM``, and prints one JSON line: the tokens, and for each
server of the chain the transports of the connections to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

import torch

from model_shards import DistributedModelForCausalLM
from model_shards._client_runtime import SwarmClient
from security import KeyPair
from transport import QuicTransport, TcpTransport


async def _transports(client: SwarmClient) -> dict[str, list[str]]:
    """The transports of the connections to each peer, once no relayed connection that a
    direct one replaced is left (it closes when its last stream ends), or after 5 s."""

    def kinds() -> dict[str, list[str]]:
        return {
            str(peer): sorted(c.transport_name for c in client.host.connections(peer))
            for peer in client.host.connected_peers()
        }

    async with asyncio.timeout(5):
        while any({"circuit", "quic"} <= set(k) for k in kinds().values()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return kinds()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    identity = KeyPair.generate()
    quic = QuicTransport(identity)
    client = SwarmClient(
        [args.bootstrap], identity=identity, transports=[TcpTransport(identity), quic]
    )
    ids = torch.tensor([[int(i) for i in args.ids.split(",")]])
    try:
        with DistributedModelForCausalLM.from_pretrained(
            args.model, initial_peers=[args.bootstrap], client=client
        ) as model:
            out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
            servers = sorted(str(peer) for peer in model.servers())
        report = {
            "tokens": out[0].tolist(),
            "servers": servers,
            "connections": client.run(_transports(client)),
        }
    finally:
        client.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
