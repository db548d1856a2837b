"""The torch side of Swarm: model families, span loading, quantization, block execution with
KV caches, the tensor wire format and model manifests. Needs the ``model`` extra
(``pip install swarm[model]``): torch, transformers, bitsandbytes, safetensors.

The networking side, on the p2p Host and the DHT: ``ShardServer``/``ServerNode`` serve a
span; ``DistributedModelForCausalLM`` generates through a chain of servers.

Names load on first use (PEP 562): ``import model_shards`` costs nothing, and the parts
that need no torch (``_announce``, the errors and limits that ``swarm status`` reads)
never import it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

_SOURCES: dict[str, tuple[str, ...]] = {
    "_cache": ("CachePool", "CacheReservation"),
    "_checkpoint": ("Checkpoint", "resolve_checkpoint_dir"),
    "_client": ("DistributedModelForCausalLM",),
    "_client_errors": ("CaughtCheating", "FailoverFailed", "PeerBanned", "RewindsExhausted"),
    "_client_runtime": ("SwarmClient",),
    "_client_session": ("ChainSession", "Failover"),
    "_client_timing": ("TokenClock",),
    "_ends": ("ModelEnds", "load_model_ends"),
    "_evidence_wire": ("EVIDENCE_PROTOCOL", "BadAnswer", "UnsignedAnswer"),
    "_errors": (
        "BadRequest",
        "CacheFull",
        "CheckpointError",
        "InvalidShape",
        "MalformedTensor",
        "ManifestMismatch",
        "SessionClosed",
        "ShardError",
        "TensorTooLarge",
        "TooLong",
        "UnknownModelFamily",
        "WrongDtype",
    ),
    "_limits": ("CacheLimits", "RequestLimits", "WireLimits"),
    "_manifest": ("Manifest", "compute_manifest", "load_manifest"),
    "_progress": ("Progress", "tqdm_progress"),
    "_quant": ("Quantization", "QuantizedExperts", "quantize_linears"),
    "_server": ("ShardServer",),
    "_server_errors": (
        "BlockNotServed",
        "PushNotAllowed",
        "ServerError",
        "ServerShuttingDown",
        "SessionTimeout",
        "UnknownSession",
    ),
    "_server_limits": ("ClientLimits", "ServerLimits"),
    "_server_node": ("Move", "PlacementLimits", "ServerConfig", "ServerNode"),
    "_spotcheck": (
        "SpotCheck",
        "SpotCheckSettings",
        "SpotCheckStats",
        "SpotChecker",
        "Verdict",
        "choose_checkers",
        "detection_bound",
    ),
    "_tolerance": ("Discrepancy", "Precision", "Tolerance", "discrepancy", "tolerance_for"),
    "_span": ("InferenceSession", "Span", "load_span", "respan"),
    "_wire": ("Compression", "decode_tensor", "encode_tensor", "serialize_tensor"),
    "families": ("FAMILIES", "ModelFamily", "family_for"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
_MODEL_EXTRA = frozenset({"torch", "transformers", "bitsandbytes", "safetensors", "tqdm"})

__all__ = [
    "EVIDENCE_PROTOCOL",
    "FAMILIES",
    "BadAnswer",
    "BadRequest",
    "BlockNotServed",
    "CacheFull",
    "CacheLimits",
    "CachePool",
    "CacheReservation",
    "CaughtCheating",
    "ChainSession",
    "Checkpoint",
    "CheckpointError",
    "ClientLimits",
    "Compression",
    "Discrepancy",
    "DistributedModelForCausalLM",
    "Failover",
    "FailoverFailed",
    "InferenceSession",
    "InvalidShape",
    "MalformedTensor",
    "Manifest",
    "ManifestMismatch",
    "ModelEnds",
    "ModelFamily",
    "Move",
    "PeerBanned",
    "PlacementLimits",
    "Precision",
    "Progress",
    "PushNotAllowed",
    "Quantization",
    "QuantizedExperts",
    "RequestLimits",
    "RewindsExhausted",
    "ServerConfig",
    "ServerError",
    "ServerLimits",
    "ServerNode",
    "ServerShuttingDown",
    "SessionClosed",
    "SessionTimeout",
    "ShardError",
    "ShardServer",
    "Span",
    "SpotCheck",
    "SpotCheckSettings",
    "SpotCheckStats",
    "SpotChecker",
    "SwarmClient",
    "TensorTooLarge",
    "TokenClock",
    "Tolerance",
    "TooLong",
    "UnknownModelFamily",
    "UnknownSession",
    "UnsignedAnswer",
    "Verdict",
    "WireLimits",
    "WrongDtype",
    "choose_checkers",
    "compute_manifest",
    "decode_tensor",
    "detection_bound",
    "discrepancy",
    "encode_tensor",
    "family_for",
    "load_manifest",
    "load_model_ends",
    "load_span",
    "quantize_linears",
    "resolve_checkpoint_dir",
    "respan",
    "serialize_tensor",
    "tolerance_for",
    "tqdm_progress",
]


def __getattr__(name: str) -> Any:
    module_name = _MODULE_OF.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as e:
        if e.name not in _MODEL_EXTRA:
            raise
        raise ModuleNotFoundError(
            f"model_shards.{name} needs {e.name}: pip install 'swarm[model]'", name=e.name
        ) from e
    obj = getattr(module, name)
    if isinstance(obj, type) or inspect.isfunction(obj):
        obj.__module__ = __name__
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
