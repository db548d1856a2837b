"""examples/chat.py: two processes on loopback exchange lines."""

from __future__ import annotations

import asyncio
import sys
from asyncio.subprocess import PIPE, Process
from pathlib import Path

import pytest

CHAT = Path(__file__).resolve().parents[2] / "examples" / "chat.py"


async def expect(process: Process, fragment: str) -> str:
    """The first line of ``process``'s output containing ``fragment``."""
    assert process.stdout is not None
    async with asyncio.timeout(30):
        while line := (await process.stdout.readline()).decode():
            if fragment in line:
                return line
    raise AssertionError(f"the chat ended without printing {fragment!r}")


async def start(*args: str) -> Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CHAT), *args, stdin=PIPE, stdout=PIPE
    )


async def finish(process: Process) -> int:
    """Close its input (the chat's end) and wait for it to exit."""
    if process.returncode is None:
        assert process.stdin is not None
        process.stdin.close()
        try:
            async with asyncio.timeout(20):
                return await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    return process.returncode


@pytest.mark.timeout(90)
async def test_a_line_typed_in_one_chat_appears_in_the_other() -> None:
    listener = await start("--listen", "/ip4/127.0.0.1/tcp/0")
    dialer: Process | None = None
    try:
        address = (await expect(listener, "listening on")).split()[-1]
        assert "/tcp/" in address and "/p2p/12D3KooW" in address
        dialer = await start("--peer", address)
        await expect(dialer, "connected to")
        assert dialer.stdin is not None and listener.stdin is not None
        dialer.stdin.write(b"hello from the dialer\n")
        assert "hello from the dialer" in await expect(listener, "hello")
        listener.stdin.write(b"and back\n")
        assert "and back" in await expect(dialer, "and back")
    finally:
        codes = [await finish(p) for p in (dialer, listener) if p is not None]
    assert codes == [0, 0]
