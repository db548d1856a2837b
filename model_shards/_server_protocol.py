"""The shard server's protocols: names, message fields, and tensors carried as payloads.

Four protocols over the ``p2p`` Host's RPC (msgpack values, raw payloads):

``INFERENCE`` (streaming call; one answer per request, in order)::

    -> {"op": "open", "model": id, "start": a, "end": b, "batch": n, "max_length": L,
        "session_id": sid, "prev": peer | None, "next": {"peer", "addrs", "session_id"} | None}
    <- {"op": "opened", "position": 0}                      (or an error, then the call ends)
    -> {"op": "step", "step": s, "push": bool, "tensors": [h, m], "compression": c}
                                                            payload: hidden [, mask]
    <- {"op": "out", "step": s, "position": p, "tensors": [h], "pushed": bool}
                                                            payload: hidden
    -> {"op": "link", "prev": peer | None, "next": {...} | None}
    <- {"op": "ok", "position": p}
    -> {"op": "rollback", "position": p}
    <- {"op": "ok", "position": p}
    -> (the client closes its side: the session is closed and its cache freed)

``session_id``, ``prev``, ``next``, ``step`` and ``push`` are optional (a client that
sends none gets the plain lock-step protocol). A step whose id is at most the last one
run is a duplicate: the client gets the last ``out`` again. With ``push`` and a ``next``,
the output (and the mask, unchanged) goes on to the next server's session by ``PUSH``
before the ``out`` is sent; ``pushed`` says whether the next server took it. A step
pushed into a session is answered by an ``out`` on that session's own stream. Once a
push to the next session was acknowledged, later ones go without waiting for their
acknowledgement (``pushed`` is then true at once); if such a push is refused, the next
server tells its own client ``{"op": "push_refused", "step": s, "reason": code}`` on that
session's stream, and the client relays the step. A server that leaves sends
``{"error": "server_shutting_down", ...}`` and ends the call.

``PUSH`` (unary, server to server)::

    -> {"session_id": sid, "step": s, "push": bool, "tensors": [h, m], "compression": c,
        "notify": bool}                                     payload: hidden [, mask]
    <- {"ok": true}                 once queued on the session (before it runs), or the
                                    RPC error unknown_session, not_allowed, bad_request,
                                    malformed_tensor or overloaded

``FORWARD`` / ``BACKWARD`` (unary): ``{"model", "start", "end", "tensors", "compression"}``
with hidden [, mask] (forward) or hidden, grad_output [, mask] (backward) as the payload;
the answer carries one tensor (the output, or the gradient of the input) and ``answer``,
the server's signed answer (a forward signs session ``b""``, step 0, the empty history;
a backward signs session ``b"backward"``).

A forward may replay a session's steps (what a spot-check or a recheck asks, so that the
checker answers the very question a session's step answered): with ``"steps": n`` the
payload holds the n steps, each as its session received it: its hidden states (any float
dtype; converted to the span's after hashing), then its mask when it had one. The server
runs every position before the last step in one pass filling a temporary cache, then the
last step on it (``Span.forward_steps``), and answers ``tensors: [before, last]``
(``[last]`` for one step); ``answer`` signs step n - 1, the history chained over the
first n - 1 steps' digests, the last step's digest and the ``last`` tensor's bytes.

An answer's input digest is the sha256 of all the request's tensor bytes (hidden states
[, grad_output] [, mask]), a pushed step's of the pushed ones.

A payload is the wire forms of its tensors (``_wire``) one after the other; ``tensors``
lists their byte lengths. An error answer is ``{"error": code, "message": ...}``
(``_server_errors``): in a stream as a message, so the session lives on after a bad
step; in a unary call as the RPC error code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._errors import BadRequest, InvalidShape, MalformedTensor
from ._limits import RequestLimits, WireLimits
from ._wire import Compression, decode_tensor, encode_tensor

INFERENCE_PROTOCOL = "/swarm/shards/inference/1.0.0"
FORWARD_PROTOCOL = "/swarm/shards/forward/1.0.0"
BACKWARD_PROTOCOL = "/swarm/shards/backward/1.0.0"
PUSH_PROTOCOL = "/swarm/shards/push/1.0.0"

MAX_TENSORS = 4
"""Most tensors one message carries."""


def pack_tensors(
    tensors: Sequence[torch.Tensor], compression: Compression = Compression.NONE
) -> tuple[list[int], bytes]:
    """The byte lengths of the tensors' wire forms and the payload holding them all.

    Hidden states and gradients travel with ``compression``; masks (integers) never do.
    """
    sizes: list[int] = []
    parts: list[bytes | bytearray | memoryview] = []
    for tensor in tensors:
        chosen = compression if tensor.is_floating_point() else Compression.NONE
        buffers = encode_tensor(tensor, chosen)
        sizes.append(sum(len(memoryview(b).cast("B")) for b in buffers))
        parts.extend(buffers)
    return sizes, b"".join(parts)


def unpack_tensors(
    sizes: object, payload: memoryview | None, limits: WireLimits, *, count: range
) -> list[torch.Tensor]:
    """The tensors of a payload (``MalformedTensor`` / ``TensorTooLarge`` on bad input).

    Every payload of these protocols starts with hidden states (or their gradient):
    ``InvalidShape`` unless the first tensor is ``[batch, tokens, hidden]``, so that no
    handler ever sizes a step from a tensor of another rank. The tensors are views of
    ``payload`` where no decompression is needed: keep it alive.
    """
    if (
        not isinstance(sizes, list)
        or not all(type(s) is int and s >= 0 for s in sizes)
        or len(sizes) not in count
    ):
        raise MalformedTensor(
            f"'tensors' must list {count.start} to {count.stop - 1} byte lengths, got {sizes!r}"
        )
    view = memoryview(b"") if payload is None else payload.cast("B")
    if sum(sizes) != len(view):
        raise MalformedTensor(
            f"tensors of {sum(sizes)} bytes announced, the payload holds {len(view)}"
        )
    tensors = []
    offset = 0
    for size in sizes:
        tensors.append(decode_tensor(view[offset : offset + size], limits))
        offset += size
    if tensors[0].ndim != 3:
        raise InvalidShape(
            f"the first tensor must be hidden states [batch, tokens, hidden], "
            f"got {list(tensors[0].shape)}"
        )
    return tensors


def require(message: Mapping[str, Any], name: str, kind: type) -> Any:
    """``message[name]`` checked to be a ``kind`` (``BadRequest`` naming the field otherwise)."""
    value = message.get(name)
    if kind is int and type(value) is not int:
        raise BadRequest(f"request field {name!r} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"request field {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def compression_of(message: Mapping[str, Any]) -> Compression:
    """The compression a request asks for its answer (default: none)."""
    value = message.get("compression", Compression.NONE.value)
    try:
        return Compression(value)
    except ValueError:
        known = ", ".join(c.value for c in Compression)
        raise BadRequest(f"unknown compression {value!r}; use one of {known}") from None


def steps_of(message: Mapping[str, Any], limits: RequestLimits) -> int | None:
    """How many session steps a forward replays (None: a plain forward)."""
    value = message.get("steps")
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= limits.max_tokens:
        raise BadRequest(
            f"'steps' must count 1 to RequestLimits.max_tokens={limits.max_tokens} steps, "
            f"got {value!r}"
        )
    return value


def as_mask(tensor: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """A received attention mask, checked to fit the hidden states it comes with."""
    if tensor.is_floating_point() or tensor.shape != hidden.shape[:2]:
        raise BadRequest(
            f"attention mask {tensor.dtype} {list(tensor.shape)} must hold integers of shape "
            f"[batch, tokens] = {list(hidden.shape[:2])}"
        )
    return tensor
