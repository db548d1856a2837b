"""The torch side of Swarm: model families, span loading, quantization, block execution with
KV caches, the tensor wire format and model manifests. Needs the ``model`` extra
(``pip install swarm[model]``): torch, transformers, bitsandbytes, safetensors.

The networking side, on the p2p Host and the DHT: ``ShardServer``/``ServerNode`` serve a
span; ``DistributedModelForCausalLM`` generates through a chain of servers.
"""

import inspect

from ._cache import CachePool, CacheReservation
from ._checkpoint import Checkpoint, resolve_checkpoint_dir
from ._client import DistributedModelForCausalLM
from ._client_runtime import SwarmClient
from ._ends import ModelEnds, load_model_ends
from ._errors import (
    BadRequest,
    CacheFull,
    CheckpointError,
    InvalidShape,
    MalformedTensor,
    ManifestMismatch,
    SessionClosed,
    ShardError,
    TensorTooLarge,
    TooLong,
    UnknownModelFamily,
    WrongDtype,
)
from ._limits import CacheLimits, RequestLimits, WireLimits
from ._manifest import Manifest, compute_manifest, load_manifest
from ._progress import Progress, tqdm_progress
from ._quant import Quantization, quantize_linears
from ._server import ShardServer
from ._server_errors import (
    BlockNotServed,
    ServerError,
    ServerShuttingDown,
    SessionTimeout,
    UnknownSession,
)
from ._server_limits import ClientLimits, ServerLimits
from ._server_node import ServerConfig, ServerNode
from ._span import InferenceSession, Span, load_span
from ._wire import Compression, decode_tensor, encode_tensor, serialize_tensor
from .families import FAMILIES, ModelFamily, family_for

__all__ = [
    "FAMILIES",
    "BadRequest",
    "BlockNotServed",
    "CacheFull",
    "CacheLimits",
    "CachePool",
    "CacheReservation",
    "Checkpoint",
    "CheckpointError",
    "ClientLimits",
    "Compression",
    "DistributedModelForCausalLM",
    "InferenceSession",
    "InvalidShape",
    "MalformedTensor",
    "Manifest",
    "ManifestMismatch",
    "ModelEnds",
    "ModelFamily",
    "Progress",
    "Quantization",
    "RequestLimits",
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
    "SwarmClient",
    "TensorTooLarge",
    "TooLong",
    "UnknownModelFamily",
    "UnknownSession",
    "WireLimits",
    "WrongDtype",
    "compute_manifest",
    "decode_tensor",
    "encode_tensor",
    "family_for",
    "load_manifest",
    "load_model_ends",
    "load_span",
    "quantize_linears",
    "resolve_checkpoint_dir",
    "serialize_tensor",
    "tqdm_progress",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
