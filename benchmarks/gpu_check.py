"""The model side on a GPU, in one run: exactness, default quantization, memory, throughput.

    python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--budget-s 200]

From the repository root; needs torch, transformers, bitsandbytes, safetensors and the core
packages' dependencies (nothing is downloaded: the models are random, built with a fixed
seed in a temporary directory). Four parts:

1. exactness: a tiny Llama and a tiny Mixtral, each loaded as two spans through
   ``load_span`` (the servers' loading code) on the device, in every dtype (float32,
   float16, bfloat16 on CUDA; float32 on CPU) and quantization (none, int8, nf4), against
   the whole transformers model cast and quantized the same way on the same device:
   logits of a prompt, and 16 greedy tokens through inference sessions;
2. servers: the same two models served by two in-process shard servers (loopback TCP,
   ``tests/swarm/harness.LocalSwarm``) with the default dtype and quantization, generating
   through ``DistributedModelForCausalLM``; on CUDA the default must be nf4 / bfloat16;
3. memory: bytes per block of a mid-size Mixtral (hidden 1024, 8 experts of 3584) on the
   device with none, int8 and nf4 (the experts are quantized too);
4. throughput: block-tokens per second of a Llama-7B-shaped block (hidden 4096,
   intermediate 11008) per dtype and quantization: one-token inference steps (what a
   server announces) and a 512-token prefill.

On a machine without CUDA the CUDA-only parts say they are skipped, and parts 3 and 4 run
with smaller shapes, so the script is tested where it is written. A table per part, then
one JSON line; exit status 1 on any mismatch or error, 0 otherwise. Half-precision greedy
tokens may part from the reference only where the reference's two best logits tie within
the dtype's rounding (reported as ``near-tie``); float32 tokens must be identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from model_shards import (  # noqa: E402
    CachePool,
    Quantization,
    Span,
    load_model_ends,
    load_span,
    quantize_linears,
)
from model_shards._dtypes import DTYPE_NAMES, DTYPES, resolve_device  # noqa: E402
from model_shards._quant import resolve_quantization  # noqa: E402
from model_shards.families import FAMILIES  # noqa: E402
from tests.model_shards.tiny import chain_forward, chain_generate, hf_blocks  # noqa: E402

VOCAB = 512
PROMPT = 12
NEW_TOKENS = 16
RELATIVE_TOLERANCE = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
"""Largest max|chain - reference| / max|reference| accepted for a prompt's logits."""


def tiny_configs() -> dict[str, transformers.PretrainedConfig]:
    """A tiny Llama and Mixtral; a wide init keeps greedy choices clear of ties."""
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.1,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": None,
    }
    return {
        "llama": transformers.LlamaConfig(intermediate_size=128, **common),
        "mixtral": transformers.MixtralConfig(
            intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **common
        ),
    }


def save_model(
    config: transformers.PretrainedConfig,
    directory: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> transformers.PreTrainedModel:
    """A random model initialised with seed 0 on ``device`` (fast for big shapes), saved."""
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().cpu()
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


# 1. exactness


@dataclass
class Exactness:
    family: str
    dtype: str
    quantization: str
    logits_rel_diff: float
    tokens: str
    """``identical``, ``near-tie at new token N`` (half precision only) or ``MISMATCH at ...``."""
    ok: bool


def reference_model(
    model: transformers.PreTrainedModel,
    dtype: torch.dtype,
    quantization: Quantization,
    device: torch.device,
) -> transformers.PreTrainedModel:
    """The whole model cast and quantized as a span of it would be, on ``device``."""
    reference = copy.deepcopy(model).to(dtype)
    experts = FAMILIES[reference.config.model_type].experts_implementation
    if experts is not None:  # fused experts computed as the span's family computes them
        reference.set_experts_implementation(experts)
    quantize_linears(hf_blocks(reference), quantization, dtype, device=device)
    return reference.to(device).eval()


def compare_tokens(
    generated: torch.Tensor,
    expected: torch.Tensor,
    reference: transformers.PreTrainedModel,
    dtype_name: str,
) -> tuple[str, bool]:
    """``identical``; or where the tokens part, whether the reference itself was torn there."""
    different = (generated.to(expected.device) != expected).any(dim=0).nonzero()
    if different.numel() == 0:
        return "identical", True
    at = int(different[0])
    new = at - (expected.shape[1] - NEW_TOKENS)
    if dtype_name == "float32":
        return f"MISMATCH at new token {new}", False
    with torch.no_grad():
        step = reference(expected[:, :at]).logits[:, -1].float()
    top2 = step.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    if margin <= 4 * RELATIVE_TOLERANCE[dtype_name] * float(step.abs().max()):
        return f"near-tie at new token {new}", True
    return f"MISMATCH at new token {new}", False


def check_exactness(
    name: str,
    path: Path,
    model: transformers.PreTrainedModel,
    dtype_name: str,
    quantization: Quantization,
    device: torch.device,
) -> Exactness:
    dtype = DTYPES[dtype_name]
    blocks = model.config.num_hidden_layers
    ends = load_model_ends(path, dtype=dtype, device=device)
    spans = [
        load_span(path, 0, blocks // 2, dtype=dtype, quantization=quantization, device=device),
        load_span(path, blocks // 2, blocks, dtype=dtype, quantization=quantization, device=device),
    ]
    reference = reference_model(model, dtype, quantization, device)
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    with torch.no_grad():
        expected = reference(ids).logits.float()
    logits = chain_forward(ends, spans, ids).float()
    rel = float((logits - expected).abs().max() / expected.abs().max())

    generated_ref = reference.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
    pool = CachePool()
    sessions = [s.open_session(pool, batch_size=2, max_length=PROMPT + NEW_TOKENS) for s in spans]
    generated = chain_generate(ends, sessions, ids, NEW_TOKENS)
    for session in sessions:
        session.close()
    tokens, tokens_ok = compare_tokens(generated, generated_ref, reference, dtype_name)
    ok = tokens_ok and rel <= RELATIVE_TOLERANCE[dtype_name]
    return Exactness(name, dtype_name, str(quantization), rel, tokens, ok)


def loaded_defaults(path: Path, device: torch.device) -> str:
    """``quantization/dtype`` of a span loaded on ``device`` with neither given."""
    span = load_span(path, 0, 1, device=device)
    return f"{span.quantization}/{DTYPE_NAMES[span.dtype]}"


# 2. servers


@dataclass
class Served:
    family: str
    dtype: str
    quantization: str
    tokens: str
    ok: bool


def check_servers(
    name: str, path: Path, model: transformers.PreTrainedModel, device: torch.device, work: Path
) -> Served:
    from model_shards import DistributedModelForCausalLM
    from tests.swarm.harness import LocalSwarm

    swarm = LocalSwarm(work / f"cache-{name}")
    try:
        blocks = model.config.num_hidden_layers
        for start, end in ((0, blocks // 2), (blocks // 2, blocks)):
            swarm.serve(path, start, end, device=str(device))
        served = [node.span for node in swarm.nodes]
        assert served == [(0, blocks // 2), (blocks // 2, blocks)], served
        with DistributedModelForCausalLM.from_pretrained(
            path, initial_peers=[swarm.addr], device=device
        ) as client:
            records = list(client.servers().values())
            quantizations = {r.quantization for r in records}
            dtypes = {r.dtype for r in records}
            assert len(quantizations) == 1 and len(dtypes) == 1, (quantizations, dtypes)
            quantization, dtype_name = quantizations.pop(), dtypes.pop()
            reference = reference_model(
                model, DTYPES[dtype_name], Quantization(quantization), device
            )
            ids = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(4))
            ids = ids.to(device)
            expected = reference.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
            generated = client.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
    finally:
        swarm.close()
    tokens, tokens_ok = compare_tokens(generated, expected, reference, dtype_name)
    want = ("nf4", "bfloat16") if device.type == "cuda" else ("none", "float32")
    defaults_ok = (quantization, dtype_name) == want
    if not defaults_ok:
        tokens += f"; default was {quantization}/{dtype_name}, want {want[0]}/{want[1]}"
    return Served(name, dtype_name, quantization, tokens, tokens_ok and defaults_ok)


# 3. memory and 4. throughput


@dataclass
class Measured:
    model: str
    dtype: str
    quantization: str
    mib_per_block: float
    step_block_tokens_per_s: float | None
    prefill_block_tokens_per_s: float | None


def measure(
    label: str,
    path: Path,
    blocks: int,
    dtype_name: str,
    quantization: Quantization,
    device: torch.device,
    *,
    steps: int,
    prefill: int,
) -> Measured:
    dtype = DTYPES[dtype_name]
    sync(device)
    before = allocated(device)
    span = load_span(path, 0, blocks, dtype=dtype, quantization=quantization, device=device)
    sync(device)
    if device.type == "cuda":
        mib = (allocated(device) - before) / blocks / 2**20
    else:
        mib = span.parameter_bytes() / blocks / 2**20
    step_rate = prefill_rate = None
    if steps:
        step_rate, prefill_rate = _rates(span, device, steps=steps, prefill=prefill)
    del span
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Measured(label, dtype_name, str(quantization), mib, step_rate, prefill_rate)


def _rates(span: Span, device: torch.device, *, steps: int, prefill: int) -> tuple[float, float]:
    blocks = span.end - span.start
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, prefill, span.hidden_size, generator=generator).to(device, span.dtype)
    pool = CachePool()
    with span.open_session(pool, batch_size=1, max_length=prefill + steps + 4) as session:
        session.step(hidden[:, :64])  # warm-up: kernels, allocator
        session.step(hidden[:, :1])
        session.rollback(0)
        sync(device)
        started = time.perf_counter()
        session.step(hidden)
        sync(device)
        prefill_rate = blocks * prefill / (time.perf_counter() - started)
        token = hidden[:, :1]
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            session.step(token)
        sync(device)
        step_rate = blocks * steps / (time.perf_counter() - started)
    return step_rate, prefill_rate


# the run


def table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (none)")
        return
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.1f}"
    return "-" if value is None else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N or cpu")
    parser.add_argument(
        "--budget-s", type=float, default=200.0, help="skip throughput rows past this time"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    errors: list[str] = []

    def attempt(what: str, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except Exception as e:  # a failing case is reported and counted, the others still run
            errors.append(f"{what}: {type(e).__name__}: {e}")
            traceback.print_exc()
            return None

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError as e:
        bnb_version = f"missing ({e})"
    environment = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb_version,
        "threads": torch.get_num_threads(),
    }
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in environment.items()))
    if not cuda:
        print(
            "no CUDA device: the CUDA parts (float16/bfloat16 exactness, nf4/bfloat16 defaults "
            "when loading) are skipped; memory and throughput use small shapes"
        )
    defaults = {
        "cuda": str(resolve_quantization(None, torch.device("cuda"))),
        "cpu": str(resolve_quantization(None, torch.device("cpu"))),
    }
    if defaults != {"cuda": "nf4", "cpu": "none"}:
        errors.append(f"default quantization is {defaults}, want nf4 on cuda, none on cpu")

    with tempfile.TemporaryDirectory(prefix="swarm-gpu-check-") as tmp:
        work = Path(tmp)
        models = {}
        for name, config in tiny_configs().items():
            models[name] = (work / name, save_model(config, work / name))

        loaded = attempt("default load", partial(loaded_defaults, models["llama"][0], device))
        want = "nf4/bfloat16" if cuda else "none/float32"
        defaults["loaded_here"] = loaded
        if loaded is not None and loaded != want:
            errors.append(f"load_span on {device} defaults to {loaded}, want {want}")

        exactness: list[Exactness] = []
        dtypes = ["float32", "float16", "bfloat16"] if cuda else ["float32"]
        for name, (path, model) in models.items():
            for dtype_name in dtypes:
                for quantization in Quantization:
                    row = attempt(
                        f"exactness {name} {dtype_name} {quantization}",
                        partial(
                            check_exactness, name, path, model, dtype_name, quantization, device
                        ),
                    )
                    if row is not None:
                        exactness.append(row)
        table(
            "1. spans vs the local model (logits of a prompt, 16 greedy tokens)",
            [asdict(r) for r in exactness],
        )

        served: list[Served] = []
        for name, (path, model) in models.items():
            row = attempt(
                f"servers {name}", partial(check_servers, name, path, model, device, work)
            )
            if row is not None:
                served.append(row)
        table(
            "2. two in-process servers, default dtype and quantization", [asdict(r) for r in served]
        )

        mixtral = transformers.MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=1024 if cuda else 256,
            intermediate_size=3584 if cuda else 896,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
        llama = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=4096 if cuda else 512,
            intermediate_size=11008 if cuda else 1376,
            num_hidden_layers=2,
            num_attention_heads=32 if cuda else 8,
            num_key_value_heads=32 if cuda else 8,
        )
        build_on = device if cuda else None
        half = ["float16", "bfloat16"] if cuda else ["bfloat16"]
        measured: list[Measured] = []
        skipped: list[str] = []
        shapes = (
            (f"mixtral h{mixtral.hidden_size} 8x{mixtral.intermediate_size}", mixtral),
            (f"llama h{llama.hidden_size} i{llama.intermediate_size}", llama),
        )
        for label, config in shapes:
            path = work / label.replace(" ", "-")
            attempt(
                f"building {label}",
                partial(save_model, config, path, dtype=torch.bfloat16, device=build_on),
            )
            for dtype_name in half:
                for quantization in Quantization:
                    what = f"{label} {dtype_name} {quantization}"
                    if time.perf_counter() - started > args.budget_s:
                        skipped.append(what)
                        continue
                    row = attempt(
                        what,
                        partial(
                            measure,
                            label,
                            path,
                            config.num_hidden_layers,
                            dtype_name,
                            quantization,
                            device,
                            steps=32 if cuda else 8,
                            prefill=512 if cuda else 64,
                        ),
                    )
                    if row is not None:
                        measured.append(row)
        table(
            "3-4. memory per block (CUDA: allocated; CPU: parameters) and block-tokens/s",
            [asdict(r) for r in measured],
        )
        if skipped:
            print(f"  skipped past --budget-s {args.budget_s:.0f}: {', '.join(skipped)}")

    mismatches = [r for r in exactness if not r.ok] + [r for r in served if not r.ok]
    ok = not errors and not mismatches
    for error in errors:
        print(f"ERROR {error}")
    for row in mismatches:
        print(f"MISMATCH {asdict(row)}")
    print(f"\n{'OK' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    summary = {
        "ok": ok,
        **environment,
        "default_quantization": defaults,
        "exactness": [asdict(r) for r in exactness],
        "servers": [asdict(r) for r in served],
        "measured": [asdict(r) for r in measured],
        "skipped": skipped,
        "errors": errors,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
