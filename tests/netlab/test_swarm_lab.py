"""Whole swarms in the lab: ``python -m swarm`` processes in namespaces serve generations.

A home cluster of three ``swarm join`` nodes with no bootstrap finds itself by mDNS and
serves a client on the same LAN; a NATed server reached through a public bootstrap (which
relays for it) serves a client behind another NAT: directly after a hole punch through
port-restricted NATs, through the relay when the server's NAT is symmetric. In every case
the tokens equal the local model's.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.model_shards.tiny import make_tiny, prompts
from tests.netlab._lab import Lab
from tests.netlab._swarm import SwarmProcess, generate

NEW_TOKENS = 6
WILDCARD = ("--listen", "/ip4/0.0.0.0/tcp/4001", "--listen", "/ip4/0.0.0.0/udp/4001/quic-v1")


def _local_tokens(model: object, ids: list[int]) -> list[int]:
    import torch

    out = model.generate(  # type: ignore[attr-defined]
        torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False
    )
    return out[0].tolist()


def _join_args(path: Path, cache: Path, blocks: str) -> list[str]:
    common = ["--threads", "1", "--cache-dir", str(cache), *WILDCARD]
    return ["join", "--model", str(path), "--blocks", blocks, *common]


async def _stop_all(procs: list[SwarmProcess]) -> None:
    await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)


@pytest.mark.netns
@pytest.mark.timeout(300)
async def test_home_cluster_finds_itself_by_mdns_and_serves_a_generation(
    lab: Lab, tmp_path: Path
) -> None:
    tiny = make_tiny("llama", tmp_path / "llama")
    ids = prompts(1, 5)[0].tolist()
    home = lab.home()
    nodes = [lab.lan_host(home) for _ in range(4)]
    procs: list[SwarmProcess] = []
    try:
        for node, blocks in zip(nodes, ("0:2", "2:3", "3:4"), strict=False):
            procs.append(await SwarmProcess.start(node, *_join_args(tiny.path, tmp_path, blocks)))
        for proc in procs:
            await proc.wait_for("listening on", 150)
        announced = time.monotonic()
        peer_ids = [(await proc.addr("/tcp/")).rsplit("/p2p/", 1)[1] for proc in procs]
        for proc, own in zip(procs, peer_ids, strict=True):
            others = [p for p in peer_ids if p != own]
            while not all(f"LAN peer {p} found by mDNS" in proc.stderr() for p in others):
                assert time.monotonic() - announced < 5.0, proc.stderr()[-3000:]
                await asyncio.sleep(0.05)
        found_s = time.monotonic() - announced
        for proc in procs:
            await proc.wait_for("online", 60)
        bootstrap = await procs[0].addr(f"/ip4/{nodes[0].ip}/tcp/")
        report = await generate(nodes[3], tiny.path, bootstrap, ids, NEW_TOKENS, timeout=150)
    finally:
        await _stop_all(procs)
    print(f"mDNS: every node found the two others {found_s:.2f}s after the last one listened")
    assert report["tokens"] == _local_tokens(tiny.model, ids)
    assert report["servers"] == sorted(peer_ids)
    for peer in peer_ids:
        assert report["connections"][peer] == ["tcp"]


@pytest.mark.netns
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("symmetric", "transport"), [(False, "quic"), (True, "circuit")], ids=["punched", "relayed"]
)
async def test_natted_server_serves_a_client_behind_another_nat(
    lab: Lab, tmp_path: Path, symmetric: bool, transport: str
) -> None:
    tiny = make_tiny("llama", tmp_path / "llama")
    ids = prompts(1, 5)[0].tolist()
    boot_node = lab.public_host("boot")
    server_node = lab.lan_host(lab.home(symmetric=symmetric))
    client_node = lab.lan_host(lab.home())
    procs: list[SwarmProcess] = []
    try:
        boot = await SwarmProcess.start(boot_node, "bootstrap", *WILDCARD)
        procs.append(boot)
        await boot.wait_for("listening on", 120)
        bootstrap = await boot.addr(f"/ip4/{boot_node.ip}/udp/4001/quic-v1")
        server = await SwarmProcess.start(
            server_node, *_join_args(tiny.path, tmp_path, "0:4"), "--bootstrap", bootstrap
        )
        procs.append(server)
        await server.wait_for("online", 150)
        server_id = (await server.addr("/tcp/")).rsplit("/p2p/", 1)[1]
        report = await generate(client_node, tiny.path, bootstrap, ids, NEW_TOKENS, timeout=150)
        server_log = server.stderr()
    finally:
        await _stop_all(procs)
    assert "cannot be reached from the internet" in server_log
    assert "reachable through relay" in server_log
    assert report["tokens"] == _local_tokens(tiny.model, ids)
    assert report["servers"] == [server_id]
    assert report["connections"][server_id] == [transport]
