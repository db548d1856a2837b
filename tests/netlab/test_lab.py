"""The lab itself behaves like the internet with home routers: checked with raw UDP first,
then with Swarm peers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.netlab._lab import Lab, Node
from tests.netlab._peers import PeerError
from tests.netlab.conftest import Spawn

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

TOOL = str(Path(__file__).with_name("udp_tool.py"))


def _start(node: Node, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        node.argv(sys.executable, TOOL, *args), stdout=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    return out.strip()


def test_nat_maps_outbound_and_drops_unsolicited_inbound(lab: Lab) -> None:
    server = lab.public_host("srv")
    home = lab.home()
    inside = lab.lan_host(home)
    echo = _start(server, "echo", "7000", "2")
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    seen = inside.sh(sys.executable, TOOL, "ask", "5000", server.ip, "7000").strip()
    assert seen == f"{home.wan_ip}:5000"  # masqueraded, inside port kept
    back = _start(inside, "echo", "5001", "1.5")
    assert back.stdout is not None and back.stdout.readline().strip() == "ready"
    assert server.sh(sys.executable, TOOL, "ask", "7001", home.wan_ip, "5001").strip() == (
        "timeout"
    )
    _finish(back)
    _finish(echo)


@pytest.mark.parametrize(("symmetric", "punched"), [(False, True), (True, False)])
def test_simultaneous_udp_punch(lab: Lab, symmetric: bool, punched: bool) -> None:
    home_a, home_b = lab.home(), lab.home(symmetric=symmetric)
    a, b = lab.lan_host(home_a), lab.lan_host(home_b)
    pa = _start(a, "punch", "5000", home_b.wan_ip, "5000", "1.5")
    pb = _start(b, "punch", "5000", home_a.wan_ip, "5000", "1.5")
    got_a, got_b = int(_finish(pa)), int(_finish(pb))
    assert (got_a > 0 and got_b > 0) is punched, (got_a, got_b)
    if not punched:
        assert got_a == got_b == 0


async def test_peers_cross_the_nat_outbound_only(lab: Lab, spawn: Spawn) -> None:
    public = await spawn(lab.public_host("pub"))
    home = lab.home()
    inside = await spawn(lab.lan_host(home))
    assert await inside.request("connect", addr=public.addr) == public.peer_id
    reply = await inside.request("echo", peer=public.peer_id, text="hi")
    assert reply == {"echo": "hi", "from": inside.peer_id}
    observed = await inside.request("addrs")
    assert f"/ip4/{home.wan_ip}/udp/{inside.hello['port']}/quic-v1" in observed["observed"]
    direct = f"/ip4/{home.wan_ip}/udp/{inside.hello['port']}/quic-v1/p2p/{inside.peer_id}"
    other = await spawn(lab.public_host("other"))
    with pytest.raises(PeerError, match=r"DialFailed|PeerUnreachable"):
        await other.request("connect", addr=direct, timeout=30)


def test_namespaces_are_deleted() -> None:
    lab = Lab()
    names = [lab.inet, lab.public_host("x").ns]
    lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
