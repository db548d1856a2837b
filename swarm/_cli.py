"""``python -m swarm``: join | generate | status | demo | bootstrap."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from dht import NotBootstrapped
from security import ReputationFileError

from . import _bootstrap, _demo, _generate, _join, _status

COMMANDS = {
    "join": (_join, "serve blocks of a model (Ctrl-C leaves gracefully)"),
    "generate": (_generate, "generate text through the swarm, streaming tokens"),
    "status": (_status, "show which servers serve which blocks"),
    "demo": (_demo, "run a whole swarm on this machine and compare it with the local model"),
    "bootstrap": (_bootstrap, "run a DHT node that serves no blocks, for others to join"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m swarm", description="Run a language model across a swarm of computers."
    )
    top.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    top.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = top.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # aioquic logs every handshake at INFO: only with -v
        logging.getLogger("quic").setLevel(max(level, logging.WARNING))
    module = COMMANDS[args.command][0]
    try:
        result = module.run(args)
        code = asyncio.run(result) if asyncio.iscoroutine(result) else result
    except KeyboardInterrupt:
        code = 130
    except (NotBootstrapped, ReputationFileError) as exc:
        print(f"swarm {args.command}: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)
