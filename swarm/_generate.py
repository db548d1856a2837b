"""``swarm generate``: generate text through the swarm, streaming tokens as they come.

A server caught cheating late makes ``generate`` rewind and draw the tokens after its
first corrupted position again (``model_shards._client``): the text printed so far is
ended with a newline, a notice goes to stderr, and the text drawn again follows.
"""

from __future__ import annotations

import argparse
import sys

from ._peer import say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or cached Hub name")
    parser.add_argument(
        "--bootstrap",
        action="append",
        required=True,
        metavar="MADDR",
        help="a peer of the swarm (repeatable)",
    )
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for every block to be served"
    )


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from model_shards._client import DistributedModelForCausalLM
    from model_shards._server_limits import ClientLimits

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"swarm generate: no tokenizer in {args.model}: {e}") from None

    class Streamer(TextStreamer):
        def rewound(self, length: int) -> None:
            self.end()
            print(
                f"[a server was caught cheating: the text after token {length} is drawn again]",
                file=sys.stderr,
                flush=True,
            )

    torch.manual_seed(args.seed)
    limits = ClientLimits(route_wait_s=args.wait)
    with DistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.bootstrap, limits=limits
    ) as model:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        sampling = (
            {
                "do_sample": True,
                "temperature": args.temperature,
                "top_k": args.top_k,
                "top_p": args.top_p,
            }
            if args.sample
            else {"do_sample": False}
        )
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=Streamer(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    say("")
    return 0
