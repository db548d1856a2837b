"""The shard server: one span of one model, served over a ``p2p.Host``.

Inference sessions are streaming calls (``_server_protocol``): the first message opens a
session and reserves its whole cache (``CacheFull`` at once when there is no room), each
step message runs its new tokens through the span in one go, a rollback forgets tokens,
and the session ends with the call (or after ``ServerLimits.session_idle_timeout_s``
without input). Stateless forward and backward are unary calls.

A session may be one hop of a chain (``_server_push``): it then has a client-chosen id in
a server-wide table, the peer allowed to push into it, and the next server's session to
push its outputs to. Its inputs, from its client's stream and from pushes, go through one
inbox; one worker (the call's handler) runs them in order, skipping steps already run.

Torch runs in one worker thread per server, one call at a time, so the event loop keeps
moving bytes for every other session meanwhile; only a step expected to take less than
``ServerLimits.inline_step_s`` (a generated token, typically) runs on the event loop itself,
sparing two thread hand-offs per token. A bad request is answered with its typed
error (``_server_errors``) and touches nothing else: the session that sent a bad step
lives on, and other sessions never notice.

Every step's ``out`` and every forward and backward reply carry ``answer``: the server's
``security.SignedAnswer`` over what it received and sent (``_evidence_wire``), signed with
the Host's identity; a wrong answer so signed is evidence against this server.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from p2p import Host, P2PError, RpcCode, RpcContext, RpcError, RpcReply, RpcStream
from scheduler import ServerState
from security import EMPTY_HISTORY, KeyPair, PeerId, SignedAnswer, chain_history, digest

from ._announce import ServerRecord
from ._cache import CachePool
from ._dtypes import dtype_name
from ._errors import BadRequest, ShardError
from ._evidence_wire import BACKWARD_SESSION
from ._manifest import Manifest
from ._server_errors import (
    BlockNotServed,
    PushNotAllowed,
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
    PUSH_PROTOCOL,
    as_mask,
    compression_of,
    pack_tensors,
    require,
    steps_of,
    unpack_tensors,
)
from ._server_push import (
    Inbox,
    NextHop,
    PushedStep,
    StepLog,
    next_of,
    prev_of,
    push_flag_of,
    push_step,
    session_id_of,
    step_id_of,
    warm_connection,
)
from ._span import InferenceSession, Span
from ._wire import Compression

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
        identity: KeyPair | None = None,
    ) -> None:
        self.host = host
        self.identity: KeyPair = identity if identity is not None else host.identity
        """Signs every answer (``SignedAnswer``); the Host's own identity by default."""
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
        self._sessions: dict[bytes, _HopSession] = {}
        self._pushes: set[asyncio.Task[None]] = set()
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
        self.host.add_rpc_handler(PUSH_PROTOCOL, self._serve_push)
        self._accepting = True

    async def stop(self) -> None:
        """Leave gracefully: refuse new sessions, let open ones go on for up to
        ``ServerLimits.drain_timeout_s``, then tell each one left ``server_shutting_down``
        and close it (its client fails over); the Host keeps running."""
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
        leaving = [hop.task for hop in self._sessions.values()]
        for hop in self._sessions.values():
            hop.inbox.finish(_LEAVE)
        tasks = list(self._session_tasks)
        for task in tasks:
            if task not in leaving:
                task.cancel()
        if leaving:
            await asyncio.wait(leaving, timeout=self.limits.leave_grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pushes = list(self._pushes)
        if pushes:
            await asyncio.wait(pushes, timeout=self.limits.push_timeout_s)
        for protocol in (INFERENCE_PROTOCOL, FORWARD_PROTOCOL, BACKWARD_PROTOCOL, PUSH_PROTOCOL):
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

    def _sign(
        self,
        session: bytes,
        step: int,
        history: bytes,
        input_digest: bytes,
        output: bytes | memoryview,
        span: Span,
    ) -> SignedAnswer:
        """This server's signed answer: one sha256 of ``output`` and one Ed25519 signature."""
        return SignedAnswer.sign(
            self.identity,
            session=session,
            step=step,
            history=history,
            input_digest=input_digest,
            output_digest=digest(output),
            span=(span.start, span.end),
            model=self.manifest.model_id,
        )

    # -- unary calls -----------------------------------------------------------------------

    async def _serve_forward(
        self, ctx: RpcContext, request: Any, payload: memoryview | None
    ) -> RpcReply:
        try:
            request = _as_request(request)
            span = self._span_for(request)
            compression = compression_of(request)
            steps = steps_of(request, span.limits)
            if steps is not None:
                return await self._forward_steps(span, request, payload, steps, compression)
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
        answer = self._sign(b"", 0, EMPTY_HISTORY, digest(payload or b""), data, span)
        return RpcReply({"tensors": sizes, "answer": answer.to_wire()}, data)

    async def _forward_steps(
        self,
        span: Span,
        request: dict[str, Any],
        payload: memoryview | None,
        steps: int,
        compression: Compression,
    ) -> RpcReply:
        """A forward replaying ``steps`` session steps (``_server_protocol``): the answer
        signs the question the session's last step answered (its index, the history of
        the earlier inputs, its input) and the last step's output bytes."""
        sizes = request.get("tensors")
        tensors = unpack_tensors(
            sizes, payload, self.limits.wire, count=range(steps, 2 * steps + 1)
        )
        groups: list[list[int]] = []
        for index, tensor in enumerate(tensors):
            if tensor.is_floating_point() and tensor.ndim == 3:
                groups.append([index])
            elif groups and len(groups[-1]) == 1 and not tensor.is_floating_point():
                groups[-1].append(index)
            else:
                raise BadRequest(
                    f"tensor {index} ({tensor.dtype} {list(tensor.shape)}) is neither a "
                    "step's hidden states nor the mask right after them"
                )
        first = tensors[0]
        if len(groups) != steps or any(
            tensors[g[0]].shape[::2] != first.shape[::2] for g in groups
        ):
            raise BadRequest(
                f"{len(groups)} steps of hidden states sent, 'steps' says {steps}; each "
                "must be float [batch, tokens, hidden] of one batch and width"
            )
        hidden = torch.cat([tensors[g[0]].to(span.dtype) for g in groups], dim=1)
        masks = [
            as_mask(tensors[g[1]], tensors[g[0]])
            if len(g) == 2
            else torch.ones(tensors[g[0]].shape[:2], dtype=torch.bool)
            for g in groups
        ]
        mask = torch.cat(masks, dim=1) if any(len(g) == 2 for g in groups) else None
        lengths = [tensors[g[0]].shape[1] for g in groups]
        view = memoryview(b"") if payload is None else payload.cast("B")
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        digests = [digest(view[offsets[g[0]] : offsets[g[-1] + 1]]) for g in groups]
        history = EMPTY_HISTORY
        for earlier in digests[:-1]:
            history = chain_history(history, earlier)

        def run() -> tuple[list[int], bytes]:
            output = span.forward_steps(self.pool, hidden, lengths, attention_mask=mask)
            last = lengths[-1]
            parts = [output[:, :-last], output[:, -last:]] if len(lengths) > 1 else [output]
            return pack_tensors(parts, compression)

        out_sizes, data = await self._compute(run)
        signed = memoryview(data)[len(data) - out_sizes[-1] :]
        answer = self._sign(b"", steps - 1, history, digests[-1], signed, span)
        return RpcReply({"tensors": out_sizes, "answer": answer.to_wire()}, data)

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
        answer = self._sign(BACKWARD_SESSION, 0, EMPTY_HISTORY, digest(payload or b""), data, span)
        return RpcReply({"tensors": sizes, "answer": answer.to_wire()}, data)

    # -- inference sessions ----------------------------------------------------------------

    async def _serve_inference(self, ctx: RpcContext, call: RpcStream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._session_tasks.add(task)
        self._idle.clear()
        hop: _HopSession | None = None
        try:
            message = await self._next(call)
            if message is None:
                return
            try:
                hop = self._open(message.value, call)
            except ShardError as e:
                await call.send(error_details(e))
                return
            self.sessions_served += 1
            await call.send({"op": "opened", "position": 0})
            await self._run_session(hop, ctx)
        except SessionTimeout as e:
            _log.debug("session of %s timed out", ctx.peer)
            await call.send(error_details(e))
        finally:
            if hop is not None:
                await hop.close()
                if self._sessions.get(hop.session_id) is hop:
                    del self._sessions[hop.session_id]
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

    def _open(self, value: Any, call: RpcStream) -> _HopSession:
        if not self._accepting:
            raise ServerShuttingDown("this server is shutting down; open the session elsewhere")
        request = _as_request(value)
        op = request.get("op")
        if op != "open":
            raise UnknownSession(f"{op!r} before any session was opened on this call")
        span = self._span_for(request)
        session_id = session_id_of(request)
        if session_id is not None and session_id in self._sessions:
            raise BadRequest("this session_id is already open here; choose 16 random bytes")
        prev, target = prev_of(request), next_of(request)
        session = span.open_session(
            self.pool,
            batch_size=require(request, "batch", int),
            max_length=require(request, "max_length", int),
        )
        task = asyncio.current_task()
        assert task is not None
        hop = _HopSession(
            session_id or os.urandom(16), session, call, Inbox(self.limits.session_queue), task
        )
        self._sessions[hop.session_id] = hop
        self._link(hop, prev, target)
        return hop

    def _link(self, hop: _HopSession, prev: PeerId | None, target: NextHop | None) -> None:
        if hop.prev is not None:
            hop.former_prevs.add(hop.prev)
        hop.prev, hop.next = prev, target
        hop.next_confirmed = False
        if hop.warming is not None:
            hop.warming.cancel()
            hop.warming = None
        if target is not None:
            hop.warming = asyncio.get_running_loop().create_task(
                warm_connection(self.host, target, self.limits.push_timeout_s)
            )

    async def _run_session(self, hop: _HopSession, ctx: RpcContext) -> None:
        """The session's worker: its inputs, client messages and pushes, one at a time."""
        reader = asyncio.get_running_loop().create_task(self._read_client(hop))
        timeout = self.limits.session_idle_timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        item = await hop.inbox.get()
                except TimeoutError:
                    raise SessionTimeout(
                        f"no input for ServerLimits.session_idle_timeout_s={timeout:g}; "
                        "the session was closed"
                    ) from None
                if item is _END:
                    return
                if item is _LEAVE:
                    await hop.call.send(
                        error_details(
                            ServerShuttingDown(
                                "this server is leaving the swarm; "
                                "continue the session on another server"
                            )
                        )
                    )
                    return
                if isinstance(item, _PushRefused):
                    reply = _refused(hop, item)
                elif isinstance(item, PushedStep):
                    reply = await self._pushed(hop, item, ctx)
                else:
                    reply = await self._handle(hop, item, ctx)
                if reply is not None:
                    await hop.call.send(reply.value, reply.payload)
        except P2PError as e:
            _log.debug("the session of %s ended: %s", ctx.peer, e)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_client(self, hop: _HopSession) -> None:
        """Feed the client's messages to the session's inbox until the client is done."""
        try:
            while (message := await hop.call.recv()) is not None:
                await hop.inbox.put(message)
            await hop.inbox.put(_END)
        except P2PError as e:
            _log.debug("the client of a session went away: %s", e)
            hop.inbox.finish(_END)

    async def _handle(self, hop: _HopSession, message: RpcReply, ctx: RpcContext) -> RpcReply:
        """One request of an open session: its answer, or its error (the session lives on)."""
        try:
            request = _as_request(message.value)
            op = request.get("op")
            if op == "step":
                step = step_id_of(request)
                if hop.log.is_duplicate(step) and hop.log.last_out is not None:
                    return hop.log.last_out
                compression = compression_of(request)
                tensors = unpack_tensors(
                    request.get("tensors"), message.payload, self.limits.wire, count=range(1, 3)
                )
                hidden = tensors[0]
                mask = as_mask(tensors[1], hidden) if len(tensors) == 2 else None
                push = push_flag_of(request)
                received = digest(message.payload or b"")
                return await self._step(hop, step, push, hidden, mask, compression, received)
            if op == "rollback":
                position = require(request, "position", int)
                hop.session.rollback(position)
                hop.forget_after(position)
                return RpcReply({"op": "ok", "position": position})
            if op == "link":
                self._link(hop, prev_of(request), next_of(request))
                return RpcReply({"op": "ok", "position": hop.session.position})
            if op == "open":
                raise BadRequest("a session is already open on this call; open another call")
            raise BadRequest(f"unknown op {op!r}; expected 'step', 'rollback' or 'link'")
        except ShardError as e:
            return RpcReply(error_details(e))
        except Exception as e:
            _log.exception("a step of %s's session failed", ctx.peer)
            return RpcReply(
                {"error": INTERNAL_ERROR, "message": f"the server failed: {type(e).__name__}"}
            )

    async def _pushed(self, hop: _HopSession, item: PushedStep, ctx: RpcContext) -> RpcReply | None:
        """A step the previous server pushed: run unless it already ran (then dropped)."""
        if hop.log.is_duplicate(item.step):
            return None
        try:
            return await self._step(
                hop,
                item.step,
                item.push,
                item.hidden,
                item.mask,
                item.compression,
                item.input_digest,
            )
        except ShardError as e:
            return RpcReply({**error_details(e), "step": item.step})
        except Exception as e:
            _log.exception("a pushed step of %s's session failed", ctx.peer)
            return RpcReply(
                {
                    "error": INTERNAL_ERROR,
                    "message": f"the server failed: {type(e).__name__}",
                    "step": item.step,
                }
            )

    async def _step(
        self,
        hop: _HopSession,
        step: int | None,
        push: bool,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        compression: Compression,
        input_digest: bytes,
    ) -> RpcReply:
        """Run one step; its ``out`` carries this server's ``SignedAnswer`` over the
        session's history, ``input_digest`` (the hidden states' bytes as received) and the
        output bytes sent back. Its step is the session's count of steps kept before it
        (0 for the first, as for a stateless forward), so that ``Evidence`` can recompute
        it from that many inputs; the client's step id stays in ``step``."""
        session = hop.session
        target = hop.next if push and step is not None else None

        def run() -> tuple[list[int], bytes, int]:
            output = session.step(hidden, attention_mask=mask)
            tensors = [output] if target is None or mask is None else [output, mask]
            sizes, data = pack_tensors(tensors, compression)
            return sizes, data, session.position

        blocks = session.span.end - session.span.start
        expected_s = hidden.shape[0] * hidden.shape[1] * blocks / max(self.throughput, 1e-9)
        if expected_s <= self.limits.inline_step_s:
            sizes, data, position = run()
        else:
            sizes, data, position = await self._compute(run)
        out: dict[str, Any] = {"op": "out", "position": position, "tensors": sizes[:1]}
        if step is not None:
            pushed = False
            if target is not None:
                request = {
                    "session_id": target.session_id,
                    "step": step,
                    "push": True,
                    "tensors": sizes,
                    "compression": compression.value,
                }
                pushed = await self._push(hop, target, request, data)
            out.update(step=step, pushed=pushed)
        sent = memoryview(data)[: sizes[0]]
        answer = self._sign(
            hop.session_id, hop.steps_kept, hop.history, input_digest, sent, session.span
        )
        hop.ran(position, input_digest)
        out["answer"] = answer.to_wire()
        reply = RpcReply(out, sent)
        hop.log.record(step, reply)
        return reply

    # -- push ------------------------------------------------------------------------------

    async def _push(
        self, hop: _HopSession, target: NextHop, request: dict[str, Any], data: bytes
    ) -> bool:
        """Push a step's output to the next server: whether it went (see ``pushed``).

        The first push to a session's next server is awaited (dial included, up to
        ``ServerLimits.push_timeout_s``) and its outcome reported. Once one was
        acknowledged, later pushes over the open connection run on their own and the
        client's ``out`` goes at once, so that a token crosses each link once (waiting for
        each acknowledgement would add a round trip per hop to the client's wait); a
        refusal then only makes the next push wait again, and the client's step deadline
        at the next hop covers the step it lost.
        """
        timeout = self.limits.push_timeout_s
        if not self.host.connections(target.peer) and not await self._connected(hop, target):
            hop.next_confirmed = False
            return False
        if not hop.next_confirmed:
            hop.next_confirmed = await push_step(self.host, target, request, data, timeout=timeout)
            return hop.next_confirmed

        notifying = {**request, "notify": True}

        async def push() -> None:
            if not await push_step(self.host, target, notifying, data, timeout=timeout):
                if hop.next is target:
                    hop.next_confirmed = False

        task = asyncio.get_running_loop().create_task(push())
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        return True

    async def _connected(self, hop: _HopSession, target: NextHop) -> bool:
        """Whether a connection to the next server is up for this step's push. The dial
        started at ``link`` is waited for; a connection lost since (the next server crashed,
        or the link dropped) is dialled again in the background while this step goes back
        through the client, so that a dead next server costs no dial timeout on the token's
        path."""
        warming = hop.warming
        if warming is None or warming.done():
            hop.warming = asyncio.get_running_loop().create_task(
                warm_connection(self.host, target, self.limits.push_timeout_s)
            )
            return False
        await asyncio.wait([warming])
        return bool(self.host.connections(target.peer))

    async def _serve_push(
        self, ctx: RpcContext, request: Any, payload: memoryview | None
    ) -> dict[str, bool]:
        """Queue a step the previous server of a chain pushed into one of our sessions.

        A push sent with ``notify`` (the sender did not wait for this answer before
        answering its client) and refused for a session held here is also told to that
        session's client (``push_refused``, in order with its answers), which then relays
        the step itself.
        """
        hop: _HopSession | None = None
        step: int | None = None
        notify = False
        try:
            request = _as_request(request)
            notify = request.get("notify") is True
            session_id = session_id_of(request)
            hop = None if session_id is None else self._sessions.get(session_id)
            if hop is None:
                raise UnknownSession("no session with this session_id is open here")
            step = step_id_of(request)
            if hop.prev is None or hop.prev != ctx.peer:
                raise PushNotAllowed(
                    f"{ctx.peer} is not the previous server this session's client named"
                )
            if step is None:
                raise BadRequest("a push must carry its step id ('step')")
            compression = compression_of(request)
            owned = None if payload is None else memoryview(bytes(payload))
            tensors = unpack_tensors(
                request.get("tensors"), owned, self.limits.wire, count=range(1, 3)
            )
            hidden = tensors[0]
            mask = as_mask(tensors[1], hidden) if len(tensors) == 2 else None
            dtype = hop.session.span.dtype
            if hidden.is_floating_point() and hidden.dtype != dtype:
                hidden = hidden.to(dtype)
            received = digest(owned or b"")
            item = PushedStep(step, push_flag_of(request), hidden, mask, compression, received)
        except ShardError as e:
            # only a server the client named as this session's prev may make it relay a step
            named = hop is not None and (hop.prev == ctx.peer or ctx.peer in hop.former_prevs)
            if notify and hop is not None and step is not None and named:
                hop.inbox.offer(_PushRefused(step, e.code))
            raise RpcError(e.code, str(e)) from None
        if not hop.inbox.offer(item):
            raise RpcError(
                RpcCode.OVERLOADED,
                f"the session holds ServerLimits.session_queue={self.limits.session_queue} "
                "inputs already (or is ending); relay through the client",
            )
        return {"ok": True}


@dataclass(frozen=True, slots=True)
class _PushRefused:
    """A push into the session was refused: its client is told, to relay the step."""

    step: int
    reason: str


def _refused(hop: _HopSession, item: _PushRefused) -> RpcReply | None:
    """The notice of a refused push, unless the step ran meanwhile (relayed by the client)."""
    if hop.log.is_duplicate(item.step):
        return None
    return RpcReply({"op": "push_refused", "step": item.step, "reason": item.reason})


class _HopSession:
    """One open inference session: its cache, its client's call, its inbox and neighbours."""

    def __init__(
        self,
        session_id: bytes,
        session: InferenceSession,
        call: RpcStream,
        inbox: Inbox[RpcReply | PushedStep | object],
        task: asyncio.Task[Any],
    ) -> None:
        self.session_id = session_id
        self.task = task
        self.session = session
        self.call = call
        self.inbox = inbox
        self.log = StepLog()
        self.prev: PeerId | None = None
        self.former_prevs: set[PeerId] = set()
        """Servers the client named as ``prev`` before its last ``link``: their refused
        in-flight pushes are still told to the client."""
        self.next: NextHop | None = None
        self.next_confirmed = False
        """Whether ``next`` acknowledged a push: later pushes then go without waiting."""
        self.warming: asyncio.Task[None] | None = None
        self.history = EMPTY_HISTORY
        """The chained digest of every kept step's input (what the next answer signs)."""
        self._histories: list[tuple[int, bytes]] = [(0, EMPTY_HISTORY)]
        """(position after a step, history after it), oldest first, for rollbacks."""

    @property
    def steps_kept(self) -> int:
        """Steps whose inputs the history chains: the index an answer signs as its step."""
        return len(self._histories) - 1

    def ran(self, position: int, input_digest: bytes) -> None:
        """A step ending at ``position`` ran on an input with ``input_digest``."""
        self.history = chain_history(self.history, input_digest)
        self._histories.append((position, self.history))

    def forget_after(self, position: int) -> None:
        """A rollback to ``position``: the history of the last step kept whole."""
        while len(self._histories) > 1 and self._histories[-1][0] > position:
            self._histories.pop()
        self.history = self._histories[-1][1]

    async def close(self) -> None:
        if self.warming is not None:
            self.warming.cancel()
            await asyncio.gather(self.warming, return_exceptions=True)
        self.session.close()


_END = object()
"""The client closed its side: the session ends after what it sent."""
_LEAVE = object()
"""The server is leaving: the session is told so and ends at once."""


def _as_request(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"a request must be a map, got {type(value).__name__}")
    return value
