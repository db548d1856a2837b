"""``python -m swarm`` processes inside the lab's namespaces, and a generation client.

``SwarmProcess`` runs one ``python -m swarm ARGS`` in a namespace, reads its stdout lines
and keeps its stderr in a file; ``stop()`` interrupts it (then kills it). ``generate``
runs ``gen_client.py`` in a namespace: a ``DistributedModelForCausalLM`` generating
greedily, printing the tokens and how it reached each server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.netlab._lab import Node

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("gen_client.py")


class SwarmProcess:
    """One ``python -m swarm`` process in ``node``'s namespace."""

    def __init__(self, node: Node, proc: asyncio.subprocess.Process, log: Any) -> None:
        self.node = node
        self._proc = proc
        self._log = log
        self.lines: list[str] = []

    @classmethod
    async def start(cls, node: Node, *args: str) -> SwarmProcess:
        log = tempfile.TemporaryFile()
        proc = await asyncio.create_subprocess_exec(
            *node.argv(sys.executable, "-m", "swarm", *args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return cls(node, proc, log)

    async def wait_for(self, prefix: str, timeout: float, *, containing: str = "") -> str:
        """The first stdout line starting with ``prefix`` and holding ``containing``
        (read so far or to come)."""
        for line in self.lines:
            if line.startswith(prefix) and containing in line:
                return line
        assert self._proc.stdout is not None
        async with asyncio.timeout(timeout):
            while raw := await self._proc.stdout.readline():
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if line.startswith(prefix) and containing in line:
                    return line
        raise AssertionError(f"swarm in {self.node.ns} exited: {self.stderr()[-3000:]}")

    async def addr(self, fragment: str, timeout: float = 10.0) -> str:
        """The announced address (a ``listening on ...`` line) containing ``fragment``."""
        line = await self.wait_for("listening on ", timeout, containing=fragment)
        return line.removeprefix("listening on ")

    def stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    async def stop(self) -> None:
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(10):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._log.close()


async def generate(
    node: Node, model: Path, bootstrap: str, ids: list[int], new_tokens: int, *, timeout: float
) -> dict[str, Any]:
    """Run ``gen_client.py`` in ``node``'s namespace; its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        *node.argv(
            sys.executable,
            str(CLIENT),
            "--model",
            str(model),
            "--bootstrap",
            bootstrap,
            "--ids",
            ",".join(map(str, ids)),
            "--new-tokens",
            str(new_tokens),
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-4000:]
    return json.loads(out.decode().strip().splitlines()[-1])
