"""Raw UDP for checking the lab's NATs (no Swarm code): run inside a namespace.

``echo PORT SECONDS``: answer each datagram with the sender's ``ip:port`` as seen here.
``ask PORT IP PORT``: send from local PORT to IP:PORT, print the answer (or ``timeout``).
``punch PORT IP PORT SECONDS``: send a datagram every 50 ms for SECONDS and print how
many came back from IP:PORT.
"""

from __future__ import annotations

import socket
import sys
import time


def _socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    sock = _socket(port)
    if mode == "echo":
        sock.settimeout(0.1)
        end = time.monotonic() + float(sys.argv[3])
        print("ready", flush=True)
        while time.monotonic() < end:
            try:
                _, (ip, sport) = sock.recvfrom(2048)
            except TimeoutError:
                continue
            sock.sendto(f"{ip}:{sport}".encode(), (ip, sport))
    elif mode == "ask":
        sock.settimeout(1.0)
        sock.sendto(b"?", (sys.argv[3], int(sys.argv[4])))
        try:
            print(sock.recvfrom(2048)[0].decode(), flush=True)
        except TimeoutError:
            print("timeout", flush=True)
    elif mode == "punch":
        target = (sys.argv[3], int(sys.argv[4]))
        sock.settimeout(0.05)
        end = time.monotonic() + float(sys.argv[5])
        got = 0
        while time.monotonic() < end:
            sock.sendto(b"punch", target)
            try:
                _, source = sock.recvfrom(2048)
            except TimeoutError:
                continue
            got += source == target
        print(got, flush=True)


if __name__ == "__main__":
    main()
