"""Driving ``peer.py`` processes in namespaces: one JSON line per request and per answer."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.netlab._lab import Node

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("peer.py")


class PeerError(Exception):
    """The peer process answered a request with an error."""


class PeerProcess:
    """A running ``peer.py``; ``hello`` holds its PeerID and listen addresses."""

    def __init__(self, node: Node, proc: asyncio.subprocess.Process, log: Any) -> None:
        self.node = node
        self._proc = proc
        self._log = log
        self._lock = asyncio.Lock()
        self.hello: dict[str, Any] = {}

    @property
    def peer_id(self) -> str:
        return str(self.hello["peer_id"])

    @property
    def addr(self) -> str:
        """The peer's QUIC address on its own interface, with ``/p2p/``."""
        return f"/ip4/{self.node.ip}/udp/{self.hello['port']}/quic-v1/p2p/{self.peer_id}"

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self._proc.stdout.readline()
        if not line:
            raise PeerError(f"peer in {self.node.ns} exited: {self.stderr()[-3000:]}")
        return json.loads(line)

    async def request(self, op: str, *, timeout: float = 20.0, **args: Any) -> Any:
        async with self._lock:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
            await self._proc.stdin.drain()
            answer = await self._line(timeout)
        if "error" in answer:
            raise PeerError(f"{op} in {self.node.ns}: {answer['error']}")
        return answer.get("result")

    def stderr(self) -> str:
        """What the peer logged so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    async def leave(self, timeout: float = 10.0) -> None:
        """End the peer gracefully (stdin closed: it stops its Host, closing connections)."""
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        async with asyncio.timeout(timeout):
            await self._proc.wait()

    async def kill(self) -> None:
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.wait()
        self._log.close()


async def start_peer(node: Node, *args: str, timeout: float = 20.0) -> PeerProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tempfile.TemporaryFile()
    proc = await asyncio.create_subprocess_exec(
        *node.argv(sys.executable, str(RUNNER), "--ip", node.ip, *args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        cwd=ROOT,
        env=env,
    )
    peer = PeerProcess(node, proc, log)
    try:
        peer.hello = await peer._line(timeout)
    except BaseException:
        await peer.kill()
        raise
    return peer
