"""The shard server: one span of one model, served over a ``p2p.Host``.

Inference sessions are streaming calls (``_server_protocol``): the first message opens a
session and reserves its whole cache (``CacheFull`` at once when there is no room), each
step message runs its new tokens through the span in one go, a rollback forgets tokens,
and the session ends with the call (or after ``ServerLimits.session_idle_timeout_s`` of
silence). Stateless forward and backward are unary calls.

Torch runs in one worker thread per server, one call at a time, so the event loop keeps
moving bytes for every other session meanwhile; only a step expected to take less than
``ServerLimits.inline_step_s`` (a generated token, typically) runs on the event loop itself,
sparing two thread hand-offs per token. A bad request is answered with its typed
error (``_server_errors``) and touches nothing else: the session that sent a bad step
lives on, and other sessions never notice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from p2p import Host, RpcContext, RpcError, RpcReply, RpcStream
from scheduler import ServerState

from ._announce import ServerRecord
from ._cache import CachePool
from ._dtypes import dtype_name
from ._errors import BadRequest, ShardError
from ._manifest import Manifest
from ._server_errors import (
    BlockNotServed,
    ServerShuttingDown,
    SessionTimeout,
    UnknownSession,
    error_details,
)
from ._server_limits import ServerLimits
from ._server_protocol import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    as_mask,
    compression_of,
    pack_tensors,
    require,
    unpack_tensors,
)
from ._span import InferenceSession, Span

_log = logging.getLogger("model_shards.server")

T = TypeVar("T")

INTERNAL_ERROR = "internal"


class ShardServer:
    """Serves ``span`` (blocks of the model ``manifest`` names) on ``host``.

    ``start()`` registers the protocols; ``stop()`` refuses new sessions, lets open ones
    finish for up to ``ServerLimits.drain_timeout_s``, then closes the rest. ``throughput``
    (block-tokens/s) is only reported, in ``describe``.
    """

    def __init__(
        self,
        host: Host,
        span: Span,
        manifest: Manifest,
        *,
        throughput: float,
        limits: ServerLimits | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.host = host
        self.span = span
        self.manifest = manifest
        self.throughput = throughput
        self.limits = limits or ServerLimits()
        self.pool = CachePool(self.limits.cache)
        self._spans: dict[tuple[int, int], Span] = {(span.start, span.end): span}
        self._executor = ThreadPoolExecutor(
            1,
            thread_name_prefix="shard-compute",
            initializer=None if torch_threads is None else torch.set_num_threads,
            initargs=() if torch_threads is None else (torch_threads,),
        )
        self._session_tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = False
        self.sessions_served = 0

    def __repr__(self) -> str:
        return f"<ShardServer {self.host.peer_id.short()} {self.span!r}>"

    @property
    def open_sessions(self) -> int:
        return self.pool.sessions

    def cache_tokens_left(self) -> int:
        """Token slots (batch x length) a new session could still reserve over the span."""
        if self.pool.sessions >= self.limits.cache.max_sessions:
            return 0
        return max(0, self.pool.free_bytes) // self.span.cache_bytes(1, 1)

    def describe(self, state: ServerState) -> ServerRecord:
        """This server's announcement with ``state`` and its live figures."""
        span = self.span
        return ServerRecord(
            peer_id=self.host.peer_id,
            state=state,
            start=span.start,
            end=span.end,
            throughput=self.throughput,
            cache_tokens_left=self.cache_tokens_left(),
            quantization=str(span.quantization),
            dtype=dtype_name(span.dtype),
            addrs=tuple(self.host.addrs),
        )

    def start(self) -> None:
        """Serve the inference, forward and backward protocols on the Host."""
        self.host.add_rpc_stream_handler(INFERENCE_PROTOCOL, self._serve_inference)
        self.host.add_rpc_handler(FORWARD_PROTOCOL, self._serve_forward)
        self.host.add_rpc_handler(BACKWARD_PROTOCOL, self._serve_backward)
        self._accepting = True

    async def stop(self) -> None:
        """Refuse new sessions, drain open ones, close what is left; the Host keeps running."""
        self._accepting = False
        if self._session_tasks:
            _log.info(
                "waiting up to %gs for %d open session(s) to finish",
                self.limits.drain_timeout_s,
                len(self._session_tasks),
            )
            try:
                async with asyncio.timeout(self.limits.drain_timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                _log.info("closing %d session(s) still open", len(self._session_tasks))
        tasks = list(self._session_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for protocol in (INFERENCE_PROTOCOL, FORWARD_PROTOCOL, BACKWARD_PROTOCOL):
            self.host.remove_handler(protocol)
        self._executor.shutdown(wait=True)

    # -- helpers ---------------------------------------------------------------------------

    async def _compute(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the compute thread; a cancelled caller still waits for it to end,
        so a session's cache is never freed under a running step."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    def _span_for(self, request: dict[str, Any]) -> Span:
        """The (sub-)span a request names, checked against what this server holds."""
        model = require(request, "model", str)
        start = require(request, "start", int)
        end = require(request, "end", int)
        span = self.span
        if model != self.manifest.model_id:
            raise BlockNotServed(
                f"model {model[:16]}... is not served here; this server serves "
                f"{self.manifest.display_name}"
            )
        if not span.start <= start < end <= span.end:
            raise BlockNotServed(
                f"blocks [{start}, {end}) are not all served here; this server serves "
                f"[{span.start}, {span.end})"
            )
        found = self._spans.get((start, end))
        if found is not None:
            return found
        offset = start - span.start
        found = Span(
            span.family,
            list(span.blocks)[offset : offset + end - start],
            start,
            dtype=span.dtype,
            device=span.device,
            quantization=span.quantization,
            limits=span.limits,
        )
        if len(self._spans) < self.limits.max_spans:
            self._spans[(start, end)] = found
        return found

    # -- unary calls -----------------------------------------------------------------------

    async def _serve_forward(
        self, ctx: RpcContext, request: Any, payload: memoryview | None
    ) -> RpcReply:
        try:
            request = _as_request(request)
            span = self._span_for(request)
            compression = compression_of(request)
            tensors = unpack_tensors(
                request.get("tensors"), payload, self.limits.wire, count=range(1, 3)
            )
            hidden = tensors[0]
            mask = as_mask(tensors[1], hidden) if len(tensors) == 2 else None

            def run() -> tuple[list[int], bytes]:
                return pack_tensors([span.forward(hidden, attention_mask=mask)], compression)

            sizes, data = await self._compute(run)
        except ShardError as e:
            raise RpcError(e.code, str(e)) from None
        return RpcReply({"tensors": sizes}, data)

    async def _serve_backward(
        self, ctx: RpcContext, request: Any, payload: memoryview | None
    ) -> RpcReply:
        try:
            request = _as_request(request)
            span = self._span_for(request)
            compression = compression_of(request)
            tensors = unpack_tensors(
                request.get("tensors"), payload, self.limits.wire, count=range(2, 4)
            )
            hidden, grad_output = tensors[:2]
            mask = as_mask(tensors[2], hidden) if len(tensors) == 3 else None

            def run() -> tuple[list[int], bytes]:
                grad = span.backward(hidden, grad_output, attention_mask=mask)
                return pack_tensors([grad], compression)

            sizes, data = await self._compute(run)
        except ShardError as e:
            raise RpcError(e.code, str(e)) from None
        return RpcReply({"tensors": sizes}, data)

    # -- inference sessions ----------------------------------------------------------------

    async def _serve_inference(self, ctx: RpcContext, call: RpcStream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._session_tasks.add(task)
        self._idle.clear()
        session: InferenceSession | None = None
        try:
            message = await self._next(call)
            if message is None:
                return
            try:
                session = self._open(message.value)
            except ShardError as e:
                await call.send(error_details(e))
                return
            self.sessions_served += 1
            await call.send({"op": "opened", "position": 0})
            while (message := await self._next(call)) is not None:
                reply = await self._handle(session, message, ctx)
                await call.send(reply.value, reply.payload)
        except SessionTimeout as e:
            _log.debug("session of %s timed out", ctx.peer)
            await call.send(error_details(e))
        finally:
            if session is not None:
                session.close()
            self._session_tasks.discard(task)
            if not self._session_tasks:
                self._idle.set()

    async def _next(self, call: RpcStream) -> RpcReply | None:
        timeout = self.limits.session_idle_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await call.recv()
        except TimeoutError:
            raise SessionTimeout(
                f"no message for ServerLimits.session_idle_timeout_s={timeout:g}; "
                "the session was closed"
            ) from None

    def _open(self, value: Any) -> InferenceSession:
        if not self._accepting:
            raise ServerShuttingDown("this server is shutting down; open the session elsewhere")
        request = _as_request(value)
        op = request.get("op")
        if op != "open":
            raise UnknownSession(f"{op!r} before any session was opened on this call")
        span = self._span_for(request)
        return span.open_session(
            self.pool,
            batch_size=require(request, "batch", int),
            max_length=require(request, "max_length", int),
        )

    async def _handle(
        self, session: InferenceSession, message: RpcReply, ctx: RpcContext
    ) -> RpcReply:
        """One request of an open session: its answer, or its error (the session lives on)."""
        try:
            request = _as_request(message.value)
            op = request.get("op")
            if op == "step":
                return await self._step(session, request, message.payload)
            if op == "rollback":
                position = require(request, "position", int)
                session.rollback(position)
                return RpcReply({"op": "ok", "position": position})
            if op == "open":
                raise BadRequest("a session is already open on this call; open another call")
            raise BadRequest(f"unknown op {op!r}; expected 'step' or 'rollback'")
        except ShardError as e:
            return RpcReply(error_details(e))
        except Exception as e:
            _log.exception("a step of %s's session failed", ctx.peer)
            return RpcReply(
                {"error": INTERNAL_ERROR, "message": f"the server failed: {type(e).__name__}"}
            )

    async def _step(
        self, session: InferenceSession, request: dict[str, Any], payload: memoryview | None
    ) -> RpcReply:
        compression = compression_of(request)
        tensors = unpack_tensors(
            request.get("tensors"), payload, self.limits.wire, count=range(1, 3)
        )
        hidden = tensors[0]
        mask = as_mask(tensors[1], hidden) if len(tensors) == 2 else None

        def run() -> tuple[list[int], bytes, int]:
            output = session.step(hidden, attention_mask=mask)
            sizes, data = pack_tensors([output], compression)
            return sizes, data, session.position

        blocks = session.span.end - session.span.start
        expected_s = hidden.shape[0] * hidden.shape[1] * blocks / max(self.throughput, 1e-9)
        if expected_s <= self.limits.inline_step_s:
            sizes, data, position = run()
        else:
            sizes, data, position = await self._compute(run)
        return RpcReply({"op": "out", "position": position, "tensors": sizes}, data)


def _as_request(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"a request must be a map, got {type(value).__name__}")
    return value
