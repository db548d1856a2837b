"""Inference sessions along a chain of servers: steps, server-to-server push, failover.

A ``ChainSession`` holds one ``HopSession`` (a streaming call, ``_server_protocol``) per hop
of its route. Every step carries an id, the same on every hop, increasing per chain.

Push (``ClientLimits.push``): the client sends a step to the first hop only, with
``push``; each server passes its output to the next server's session (``PUSH``) and still
sends it to the client, which reads every hop's ``out`` in order. An ``out`` that says
``pushed: false`` (the next server refused or did not answer; an older server says
nothing) makes the client relay that output itself. Without push, the client relays
every hop's output (one round trip per hop).

Failover: the client keeps every hop's inputs (the previous hop's outputs) for all the
tokens the servers hold, rolled back with them. When a hop fails (the connection is lost,
the step passes its deadline, the server ends the session or answers that it holds no such
session, is leaving, or failed itself) its server is banned (softly when it only missed a
deadline: ``RemoteChain.ban``), a replacement for exactly its
blocks is routed (``RemoteChain.replace``: one or several servers), its sessions are
opened and given the kept inputs as one step (step id 0, before any real step), the
neighbours are relinked (``link``) for push, and the step goes on from that hop. Attempts
are bounded (``ClientLimits.max_failovers``, with backoff); blocks no server serves any
more give ``MissingBlocksError`` after ``ClientLimits.failover_wait_s``.

Signed answers (``_evidence_wire``): every ``out`` is checked on receipt (its server's
signature over the bytes received); a bad one, or none from a server that signed before,
fails the hop over. A hop caught cheating on its first step is accused: evidence with the
checkers' signed forwards is published to the DHT (best effort, ``ChainSession.evidence``).

A step's deadline at one hop adapts to its size: ``step_timeout_base_s`` plus
``step_timeout_factor`` times ``batch x tokens x blocks / throughput`` (the server's
announced throughput), so a killed server, which over QUIC sends nothing, stalls a
generated token about ``step_timeout_base_s`` while a long prefill gets its time.
Slow but alive is not failed: a hop past its deadline whose blocks no other server serves,
and that still answers a ping, is waited for (the deadline doubling, up to
``ClientLimits.call_timeout_s``) rather than failed over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2p import P2PError, RpcReply, RpcStream
from security import Evidence, PeerId, digest

from ._client_chain import Hop, RemoteChain, is_lost, output_of, wire_mask
from ._client_errors import CaughtCheating, FailoverFailed
from ._errors import ShardError, TooLong
from ._evidence_wire import KEPT_ANSWERS, Exchange, accuse, answer_of, host_identity, publish
from ._server_errors import ServerError, remote_error
from ._server_protocol import INFERENCE_PROTOCOL, pack_tensors
from ._spotcheck import SpotCheck, SpotChecker, Verdict

_log = logging.getLogger("model_shards.client")

REPLAY_STEP = 0
"""Step id of a replay into freshly opened sessions; real steps are numbered from 1."""

_FAILURES = (P2PError, TimeoutError, ConnectionError, ShardError)


@dataclass(frozen=True, slots=True)
class Failover:
    """One replaced hop: its blocks, the server that failed, what replaced it, and when."""

    start: int
    end: int
    failed: PeerId
    replacement: tuple[Hop, ...]
    cause: str
    attempts: int
    seconds: float
    """From noticing the failure to the replacement holding every kept token."""


class _Lost(Exception):
    """A hop failed in a way that calls for a replacement (``__cause__``: the failure)."""

    def __init__(self, peer: PeerId, error: BaseException) -> None:
        super().__init__(f"{peer.short()}: {error}")
        self.peer = peer
        self.error = error


class HopSession:
    """One server's inference session: a streaming call kept open for the whole generation."""

    def __init__(
        self,
        chain: RemoteChain,
        hop: Hop,
        call: RpcStream,
        session_id: bytes,
        prev: PeerId | None,
        next_hop: dict[str, Any] | None,
    ) -> None:
        self.chain = chain
        self.hop = hop
        self.session_id = session_id
        self.prev = prev
        self.next_hop = next_hop
        self.position = 0
        self._call = call
        self.exchanges: deque[Exchange] = deque(maxlen=KEPT_ANSWERS)
        """The server's latest signed answers, with the bytes they sign."""
        self.signs = False
        """Whether the server signed an answer: from then on every answer must be signed."""
        self._sent: tuple[int, bytes] | None = None
        """The last step sent and its hidden states' bytes."""

    def __repr__(self) -> str:
        return f"<HopSession {self.hop}>"

    @classmethod
    async def open(
        cls,
        chain: RemoteChain,
        hop: Hop,
        *,
        batch_size: int,
        max_length: int,
        session_id: bytes,
        prev: PeerId | None,
        next_hop: dict[str, Any] | None,
    ) -> HopSession:
        async with asyncio.timeout(chain.limits.connect_timeout_s):
            call = await chain.host.rpc_open(hop.peer_id, INFERENCE_PROTOCOL)
            session = cls(chain, hop, call, session_id, prev, next_hop)
            try:
                await call.send(
                    {
                        "op": "open",
                        "model": chain.model_id,
                        "start": hop.start,
                        "end": hop.end,
                        "batch": batch_size,
                        "max_length": max_length,
                        "session_id": session_id,
                        "prev": None if prev is None else str(prev),
                        "next": next_hop,
                    }
                )
                opened = (await session._recv()).value
                if "error" in opened:
                    raise remote_error(opened, hop.peer_id)
            except BaseException:
                call.cancel()
                raise
        return session

    def describe(self) -> dict[str, Any]:
        """This session as the previous server's ``next``: where to push, and into what."""
        record = self.chain.record(self.hop.peer_id)
        addrs = [] if record is None else [str(a) for a in record.addrs]
        return {"peer": str(self.hop.peer_id), "addrs": addrs, "session_id": self.session_id}

    def deadline_s(self, tokens: int, *, push: bool = False) -> float:
        """How long a step of ``tokens`` (batch x new tokens) may take here (a rollback or
        link: ``tokens=0``), pushing its output on or not (``RemoteChain.deadline_s``)."""
        deadline = self.chain.deadline_s(self.hop, tokens)
        if push:
            deadline += self.chain.limits.push_allowance_s
        return min(self.chain.limits.call_timeout_s, deadline)

    async def _recv(self) -> RpcReply:
        """The next message (typed errors for an error message or the end of the call)."""
        reply = await self._call.recv()
        if reply is None:
            raise ServerError(f"{self.hop.peer_id} ended the session", remote_code="session_ended")
        if not isinstance(reply.value, dict):
            raise ServerError(
                f"{self.hop.peer_id} sent a {type(reply.value).__name__}, not a map",
                remote_code="bad_answer",
            )
        return reply

    async def send_step(
        self, step: int, hidden: torch.Tensor, mask: torch.Tensor | None, *, push: bool
    ) -> None:
        tensors = [hidden.to(self.hop.dtype)]
        if mask is not None:
            tensors.append(mask)
        sizes, payload = pack_tensors(tensors, self.chain.compression)
        self._sent = (step, payload[: sizes[0]])
        request = {
            "op": "step",
            "step": step,
            "push": push,
            "tensors": sizes,
            "compression": self.chain.compression.value,
        }
        await self._call.send(request, payload)

    async def recv_out(
        self, step: int, timeout: float, *, relayed: bool
    ) -> tuple[torch.Tensor, bool] | None:
        """This hop's output for ``step`` and whether the next server took it (a push), or
        None when the server says the push of ``step`` into it was refused and the client
        has not ``relayed`` the step yet; answers to earlier steps are skipped."""
        async with asyncio.timeout(timeout):
            while True:
                reply = await self._recv()
                value = reply.value
                answered = value.get("step")
                if isinstance(answered, int) and answered < step:
                    continue
                if value.get("op") == "push_refused":
                    if not relayed and answered == step:
                        return None
                    continue
                if "error" in value:
                    raise remote_error(value, self.hop.peer_id)
                self.position = value.get("position", -1)
                output = output_of(reply, self.hop, self.chain.limits)
                self._verify(reply, answered)
                return output, value.get("pushed") is True

    def _verify(self, reply: RpcReply, step: object) -> None:
        """Check the signed answer of ``reply`` (``answer_of``) and keep it, with the input
        bytes it signs when the client sent them; ``ServerError`` (a failover) when it does
        not hold, or is missing from a server that signed."""
        answer = answer_of(
            reply.value, self.hop, self.chain.model_id, reply.payload, session=self.session_id
        )
        if answer is None:
            if self.signs:
                raise ServerError(
                    f"{self.hop.peer_id} stopped signing its answers", remote_code="bad_answer"
                )
            return
        self.signs = True
        sent = self._sent[1] if self._sent is not None and self._sent[0] == step else None
        if sent is not None and digest(sent) != answer.input_digest:
            sent = None  # a step the server had run already, on a pushed input: its answer
        self.exchanges.append(Exchange(answer, sent, bytes(reply.payload or b"")))

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a rollback or link and read its answer, skipping answers to earlier steps."""
        async with asyncio.timeout(self.deadline_s(0)):
            await self._call.send(message)
            while True:
                value = (await self._recv()).value
                if value.get("op") in ("out", "push_refused") or (
                    "error" in value and "step" in value
                ):
                    continue
                if "error" in value:
                    raise remote_error(value, self.hop.peer_id)
                return value

    async def rollback(self, position: int) -> None:
        await self._request({"op": "rollback", "position": position})
        self.position = position

    async def link(self, prev: PeerId | None, next_hop: dict[str, Any] | None) -> None:
        """Tell the server who may push into this session and where it pushes to."""
        await self._request(
            {"op": "link", "prev": None if prev is None else str(prev), "next": next_hop}
        )
        self.prev, self.next_hop = prev, next_hop

    def abort(self) -> None:
        """Drop the call at once (a failed hop: nothing more is read from it)."""
        self._call.cancel()

    async def close(self) -> None:
        """End the session (its cache is freed on the server)."""
        try:
            await self._call.aclose()
        except P2PError as e:
            _log.debug("closing the session with %s: %s", self.hop.peer_id.short(), e)


async def open_hops(
    chain: RemoteChain,
    hops: Sequence[Hop],
    *,
    batch_size: int,
    max_length: int,
    prev: PeerId | None = None,
    after: HopSession | None = None,
) -> list[HopSession]:
    """Sessions on ``hops``, all opened at once and linked to each other for push: the
    first takes pushes from ``prev``, the last pushes into ``after``. A failure closes
    the others and raises ``_Lost`` (a server to ban) or the caller's error."""
    ids = [os.urandom(16) for _ in hops]
    records = [chain.record(h.peer_id) for h in hops]
    nexts: list[dict[str, Any] | None] = [
        {
            "peer": str(h.peer_id),
            "addrs": [] if r is None else [str(a) for a in r.addrs],
            "session_id": sid,
        }
        for h, r, sid in zip(hops[1:], records[1:], ids[1:], strict=True)
    ]
    nexts.append(None if after is None else after.describe())
    prevs = [prev, *(h.peer_id for h in hops[:-1])]
    opened = await asyncio.gather(
        *(
            HopSession.open(
                chain,
                hop,
                batch_size=batch_size,
                max_length=max_length,
                session_id=sid,
                prev=before,
                next_hop=target,
            )
            for hop, sid, before, target in zip(hops, ids, prevs, nexts, strict=True)
        ),
        return_exceptions=True,
    )
    sessions = [s for s in opened if isinstance(s, HopSession)]
    for hop, result in zip(hops, opened, strict=True):
        if isinstance(result, BaseException):
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
            if isinstance(result, _FAILURES) and is_lost(result):
                raise _Lost(hop.peer_id, result) from result
            raise result
    return sessions


class ChainSession:
    """Inference sessions along a whole chain: ``step`` new tokens, ``rollback``, ``close``."""

    def __init__(
        self,
        chain: RemoteChain,
        hops: list[HopSession],
        *,
        batch_size: int,
        max_length: int,
        checker: SpotChecker | None = None,
    ) -> None:
        self.chain = chain
        self.hops = hops
        self.checker = checker
        """Spot-checks each hop's steps (None: no checks)."""
        self.caught: list[SpotCheck] = []
        """Every spot-check that caught a hop of this session cheating, in order."""
        self.evidence: list[Evidence] = []
        """Evidence published against the hops caught cheating, in order."""
        self.batch_size = batch_size
        self.max_length = max_length
        self.position = 0
        self.push = chain.limits.push
        self.failovers: list[Failover] = []
        """Every hop replaced so far, in order."""
        self.sends = 0
        """Steps the client sent to hops itself: one per step where every server pushed,
        one per hop where the client relayed."""
        self._steps = 0
        self._inputs: dict[int, torch.Tensor] = {}
        """Per block boundary: the hidden states that entered it, for the held tokens."""
        self._mask = torch.ones(batch_size, max_length, dtype=torch.bool)

    @classmethod
    async def open(
        cls,
        chain: RemoteChain,
        *,
        batch_size: int,
        max_length: int,
        checker: SpotChecker | None = None,
    ) -> ChainSession:
        """Sessions along a fresh least-latency route; a server that fails to open one is
        banned and another route tried (``ClientLimits.max_failovers`` times)."""
        limits = chain.limits
        attempt = 0
        while True:
            hops = await chain.route(min_cache_tokens=batch_size * max_length)
            try:
                sessions = await open_hops(
                    chain, hops, batch_size=batch_size, max_length=max_length
                )
            except _Lost as e:
                if attempt >= limits.max_failovers:
                    raise e.error from None
                _log.info("could not open a session on %s: %s", e.peer.short(), e.error)
                chain.ban(e.peer, soft=isinstance(e.error, TimeoutError))
                await asyncio.sleep(_backoff_s(chain, attempt))
                attempt += 1
                continue
            return cls(
                chain, sessions, batch_size=batch_size, max_length=max_length, checker=checker
            )

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    async def step(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run new tokens' hidden states through every hop; the last hop's output."""
        batch, tokens = hidden.shape[:2]
        if self.position + tokens > self.max_length:
            raise TooLong(
                f"{self.position} + {tokens} tokens exceed the session's "
                f"max_length={self.max_length}"
            )
        mask = wire_mask(attention_mask)
        self._steps += 1
        step = self._steps
        inputs = {self.hops[0].hop.start: hidden}
        done: list[HopSession] = []
        cheaters: list[HopSession] = []
        send = True
        index = 0
        while index < len(self.hops):
            hop = self.hops[index]
            last = index + 1 == len(self.hops)
            push = self.push and not last
            try:
                if send:
                    self.sends += 1
                    await hop.send_step(step, inputs[hop.hop.start], mask, push=push)
                deadline = hop.deadline_s(batch * tokens, push=push)
                try:
                    answer = await self._recv_out(index, step, deadline, relayed=send)
                except TimeoutError:
                    if send:
                        raise
                    answer = None  # the pushed step never showed up there: relay it
                if answer is None:
                    send = True
                    continue
                output, pushed = answer
            except _FAILURES as e:
                if not is_lost(e):
                    # the hops that ran the step forget it, so that the chain stays consistent
                    await asyncio.gather(
                        *(h.rollback(self.position) for h in done), return_exceptions=True
                    )
                    raise
                await self._failover(index, e)
                send = True
                continue
            inputs[hop.hop.end] = output.to(hidden.dtype)
            done.append(hop)
            send = not pushed
            index += 1
            if self.checker is not None and hop not in cheaters:
                corrected = await self._check(hop, step, inputs, output, attention_mask)
                if corrected is not None:
                    inputs[hop.hop.end] = corrected.to(hidden.dtype)
                    cheaters.append(hop)
                    if pushed:
                        await self._undo_pushed(index, step)
                    # later hops run the corrected output as a new step: a server answers a
                    # step id it already ran from its log, even after a rollback
                    self._steps += 1
                    step = self._steps
                    send = True
        self._keep(inputs, attention_mask, tokens)
        self.position += tokens
        for cheater in cheaters:
            await self._failover(
                self.hops.index(cheater), CaughtCheating(cheater.hop.peer_id, self.caught[-1])
            )
        return inputs[self.hops[-1].hop.end].clone()

    async def _check(
        self,
        hop: HopSession,
        step: int,
        inputs: dict[int, torch.Tensor],
        output: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Spot-check (maybe) ``hop``'s answer to this step; the majority's output in its
        place when the hop was caught cheating (it is banned), else None."""
        assert self.checker is not None
        held = self.position
        new = inputs[hop.hop.start]
        history = [new] if held == 0 else [self._inputs[hop.hop.start][:, :held], new]
        step_mask = (
            torch.ones(new.shape[:2], dtype=torch.bool)
            if attention_mask is None
            else attention_mask.detach().cpu() != 0
        )
        mask = torch.cat([self._mask[:, :held], step_mask], dim=1)
        result = await self.checker.after_step(
            hop.hop, history, output, mask=None if bool(mask.all()) else mask
        )
        if result is None or result.verdict is not Verdict.CHEATER:
            return None
        assert result.replacement is not None  # a CHEATER verdict carries the majority's
        _log.warning("hop %s caught cheating at step %d: %s", hop.hop, step, result.reason)
        self.caught.append(result)
        self.chain.ban(hop.hop.peer_id)
        await self._accuse(hop, result)
        return result.replacement

    async def _accuse(self, hop: HopSession, result: SpotCheck) -> None:
        """Publish evidence against ``hop``'s server when its last signed answer and the
        majority's signed forwards make it (``accuse``); best effort, bounded in time."""
        if not hop.exchanges:
            return
        index = self.hops.index(hop)
        before = self.hops[index - 1] if index > 0 else None
        previous = before.exchanges[-1] if before is not None and before.exchanges else None
        witnesses = [a for a in result.signed if a.signer in result.majority]
        evidence = accuse(
            host_identity(self.chain.host), hop.exchanges[-1], witnesses, previous=previous
        )
        if evidence is not None and await publish(self.chain.dht, evidence):
            self.evidence.append(evidence)

    async def _undo_pushed(self, index: int, step: int) -> None:
        """Hops from ``index`` on ran ``step`` on a pushed output found wrong: one after the
        other, wait for each to answer the pushed step (so that it has pushed on, if at all)
        and roll it back to the step's start, until one did not push on."""
        for hop in self.hops[index:]:
            try:
                answer = await hop.recv_out(step, hop.deadline_s(0, push=True), relayed=False)
            except TimeoutError:
                answer = None  # the push never arrived: nothing ran there
            if answer is None:
                return
            await hop.rollback(self.position)
            if not answer[1]:
                return

    async def _recv_out(
        self, index: int, step: int, deadline: float, *, relayed: bool
    ) -> tuple[torch.Tensor, bool] | None:
        """Hop ``index``'s answer to ``step`` (``HopSession.recv_out``). A hop the client
        sent the step to that misses its deadline while no other server could take over
        its blocks is slow, not gone, as long as it answers a ping: the client keeps
        waiting on it, the deadline doubling each time, up to ``ClientLimits.call_timeout_s``
        in all; ``TimeoutError`` once it does not (then it fails over)."""
        hop = self.hops[index]
        limits = self.chain.limits
        waited = 0.0
        while True:
            try:
                return await hop.recv_out(step, deadline, relayed=relayed)
            except TimeoutError:
                waited += deadline
                if not relayed or waited >= limits.call_timeout_s or not await self._stay(index):
                    raise
                deadline = min(2 * deadline, limits.call_timeout_s - waited)
                _log.info(
                    "hop %s is slow (%.1fs on step %d) and has no spare; waiting %.1fs more",
                    hop.hop,
                    waited,
                    step,
                    deadline,
                )

    async def _stay(self, index: int) -> bool:
        """Whether to keep waiting on hop ``index`` rather than fail it over: no spare
        serves its blocks, and its server still answers a ping."""
        chain = self.chain
        hop = self.hops[index].hop
        if await chain.spare(self.route, index, min_cache_tokens=self.batch_size * self.max_length):
            return False
        try:
            async with asyncio.timeout(chain.limits.ping_timeout_s):
                await chain.host.ping(hop.peer_id)
        except (P2PError, TimeoutError) as e:
            _log.info("slow hop %s does not answer a ping either: %s", hop, e)
            return False
        return True

    def _keep(
        self, inputs: dict[int, torch.Tensor], attention_mask: torch.Tensor | None, tokens: int
    ) -> None:
        """Remember this step's inputs of every hop, for replays."""
        span = slice(self.position, self.position + tokens)
        for hop in self.hops:
            state = inputs[hop.hop.start]
            kept = self._inputs.get(hop.hop.start)
            if kept is None:
                kept = state.new_empty(self.batch_size, self.max_length, *state.shape[2:])
                self._inputs[hop.hop.start] = kept
            kept[:, span] = state
        if attention_mask is None:
            self._mask[:, span] = True
        else:
            self._mask[:, span] = attention_mask.detach().cpu() != 0

    async def _failover(self, index: int, error: BaseException) -> None:
        """Replace ``self.hops[index]`` by sessions on other servers holding every kept
        token; ``FailoverFailed`` or ``MissingBlocksError`` when none can be had."""
        chain = self.chain
        limits = chain.limits
        failed = self.hops[index]
        began = time.monotonic()
        _log.info("hop %s failed (%s: %s); failing over", failed.hop, type(error).__name__, error)
        if not isinstance(error, CaughtCheating):  # already banned, for good
            chain.ban(failed.hop.peer_id, soft=isinstance(error, TimeoutError))
        failed.abort()
        cause: BaseException = error
        for attempt in range(limits.max_failovers):
            if attempt:
                await asyncio.sleep(_backoff_s(chain, attempt - 1))
            before = self.hops[index - 1] if index > 0 else None
            after = self.hops[index + 1] if index + 1 < len(self.hops) else None
            try:
                hops = await chain.replace(
                    self.route,
                    index,
                    num_tokens=1,
                    min_cache_tokens=self.batch_size * self.max_length,
                )
                sessions = await open_hops(
                    chain,
                    hops,
                    batch_size=self.batch_size,
                    max_length=self.max_length,
                    prev=None if before is None else before.hop.peer_id,
                    after=after,
                )
                try:
                    await self._replay(sessions)
                except BaseException:
                    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
                    raise
            except _Lost as e:
                _log.info("replacement %s failed: %s", e.peer.short(), e.error)
                chain.ban(e.peer, soft=isinstance(e.error, TimeoutError))
                cause = e.error
                continue
            if self.push:
                await self._relink(before, sessions, after)
            self.hops[index : index + 1] = sessions
            starts = {h.hop.start for h in self.hops}
            self._inputs = {b: kept for b, kept in self._inputs.items() if b in starts}
            event = Failover(
                failed.hop.start,
                failed.hop.end,
                failed.hop.peer_id,
                tuple(s.hop for s in sessions),
                f"{type(error).__name__}: {error}",
                attempt + 1,
                time.monotonic() - began,
            )
            self.failovers.append(event)
            _log.info(
                "blocks [%d, %d) moved to %s in %.3fs",
                event.start,
                event.end,
                " -> ".join(map(str, event.replacement)),
                event.seconds,
            )
            return
        raise FailoverFailed(
            failed.hop.start, failed.hop.end, limits.max_failovers, cause
        ) from cause

    async def _replay(self, sessions: list[HopSession]) -> None:
        """Give fresh sessions every token the chain holds, as one step."""
        held = self.position
        if held == 0:
            return
        hidden = self._inputs[sessions[0].hop.start][:, :held]
        mask = wire_mask(self._mask[:, :held])
        for number, session in enumerate(sessions):
            try:
                await session.send_step(REPLAY_STEP, hidden, mask, push=False)
                answer = await session.recv_out(
                    REPLAY_STEP, session.deadline_s(self.batch_size * held), relayed=True
                )
            except _FAILURES as e:
                if is_lost(e):
                    raise _Lost(session.hop.peer_id, e) from e
                raise
            assert answer is not None  # a step the client sent is never refused as a push
            hidden = answer[0].to(hidden.dtype)
            if number + 1 < len(sessions):
                kept = hidden.new_empty(self.batch_size, self.max_length, *hidden.shape[2:])
                kept[:, :held] = hidden
                self._inputs[session.hop.end] = kept

    async def _relink(
        self, before: HopSession | None, sessions: list[HopSession], after: HopSession | None
    ) -> None:
        """Point the neighbours of a replaced hop at its replacement (push). A neighbour
        that cannot be told only loses push there: its step is relayed by the client."""
        links = []
        if before is not None:
            links.append(before.link(before.prev, sessions[0].describe()))
        if after is not None:
            links.append(after.link(sessions[-1].hop.peer_id, after.next_hop))
        for result in await asyncio.gather(*links, return_exceptions=True):
            if isinstance(result, BaseException):
                _log.info("could not relink a neighbour of a replaced hop: %s", result)

    async def rollback(self, position: int) -> None:
        """Forget every token after the first ``position`` ones, on every hop (a hop that
        fails meanwhile is replaced, holding the first ``position`` tokens)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self.position}")
        self.position = position
        results = await asyncio.gather(
            *(h.rollback(position) for h in self.hops), return_exceptions=True
        )
        # from the last hop back, so that a hop replaced by several keeps earlier indices
        for index in reversed(range(len(results))):
            result = results[index]
            if isinstance(result, BaseException):
                if not isinstance(result, _FAILURES) or not is_lost(result):
                    raise result
                await self._failover(index, result)

    async def close(self) -> None:
        await asyncio.gather(*(h.close() for h in self.hops), return_exceptions=True)


def _backoff_s(chain: RemoteChain, attempt: int) -> float:
    limits = chain.limits
    return min(limits.failover_backoff_max_s, limits.failover_backoff_s * 2**attempt)
