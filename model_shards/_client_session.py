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
fails the hop over. A hop caught cheating is accused: evidence with its signed answer to
the checked step and the checkers' signed forwards is published to the DHT (best effort,
``ChainSession.evidence``).

Spot-checks (``SpotChecker``): a check that must block (paranoid, a server on probation,
``SpotCheckSettings.background`` off) is awaited before the step's output is used: a
cheater's output is replaced by the majority's, or, when it had corrupted earlier held
positions, the chain is rewound (``Rewind``). Any other runs in the background, on a copy
of the step (``_Taken``), while the chain goes on; ``step`` acts on those finished when it
starts, and ``settle`` waits for all and acts on them (``generate`` settles before it
returns): a cheater caught is banned, its other checks dropped, the chain rewound to the
first position it had answered wrongly, up to the end of the checked step, and the cheater
failed over if it still serves the chain. Rollbacks and rewinds narrow the positions a
running check may judge; ``close`` cancels the checks still running.

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
from itertools import pairwise
from typing import Any

import torch

from p2p import P2PError, RpcReply, RpcStream
from security import Evidence, PeerId, digest

from ._client_chain import Hop, RemoteChain, is_lost, output_of, wire_mask
from ._client_errors import CaughtCheating, FailoverFailed
from ._errors import ShardError, TooLong
from ._evidence_wire import (
    KEPT_ANSWERS,
    Exchange,
    accuse,
    answer_of,
    desk_of,
    encode_steps,
    host_identity,
    publish,
)
from ._server_errors import ServerError, remote_error
from ._server_protocol import INFERENCE_PROTOCOL, pack_tensors
from ._spotcheck import SpotCheck, SpotChecker, Verdict, precision_of
from ._tolerance import token_discrepancy, tolerance_for

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


class Rewind(Exception):
    """A signal, not an error: a hop caught cheating (at this step, or at an earlier one by
    a background check) had corrupted a position, ``position``, whose state the chain had
    used already. The chain was rolled back to it (it holds the first ``position`` tokens)
    with the cheater banned and failed over; every token drawn from ``position`` on came
    from corrupted states and must be drawn again (``DistributedModelForCausalLM.generate``
    does)."""

    def __init__(self, position: int, check: SpotCheck) -> None:
        super().__init__(
            f"{check.checked.short()} was caught cheating and had corrupted position "
            f"{position} already: the chain rolled back to it"
        )
        self.position = position
        self.check = check


@dataclass(frozen=True, slots=True)
class _Taken:
    """A hop's step as a spot-check of it needs it, taken when the hop answered (a
    background check runs while the chain goes on): what the check replays and compares,
    and the signed answers that make evidence."""

    hop: HopSession
    step: int
    held: int
    """Positions the chain held before the step."""
    end: int
    """Positions after it: the step covers ``held`` to ``end``."""
    history: tuple[torch.Tensor, ...]
    """The hop's inputs: the held positions' (when any), then the step's."""
    output: torch.Tensor
    mask: torch.Tensor
    """Which of the ``end`` positions are tokens (not padding), ``[batch, end]``."""
    lengths: tuple[int, ...] | None
    """The positions of each step the hop's server keeps (``HopSession.step_lengths``)."""
    exchange: Exchange | None
    """The hop's signed answer to the step."""
    pushed: bytes | None
    """The previous hop's output of the step (the hop's input, when that hop pushed it)."""


@dataclass(eq=False, slots=True)
class _Pending:
    """A spot-check running in the background."""

    taken: _Taken
    task: asyncio.Task[SpotCheck]
    valid: int
    """The positions still held as they were when the step ran (rollbacks and rewinds
    lower it): the verdict's majority output is compared with those only."""


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
        self._ends: list[int] = []
        """The position after each step the server keeps (its history), oldest first."""
        self._sent: tuple[int, bytes] | None = None
        """The last step sent and its bytes (hidden states [, mask]: what the answer signs)."""

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
        self._sent = (step, payload)
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
        bytes it signs when the client sent them, and the step's end; ``ServerError`` (a
        failover) when it does not hold or is missing."""
        answer = answer_of(
            reply.value, self.hop, self.chain.model_id, reply.payload, session=self.session_id
        )
        if not self._ends or self.position > self._ends[-1]:
            self._ends.append(self.position)
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

    def step_lengths(self) -> tuple[int, ...] | None:
        """The positions of each step the server keeps, the last being its latest answer's
        (a checker replays them: ``_evidence_wire.forward_steps``); None when they do not
        match that answer's step index."""
        ends = self._ends
        if not self.exchanges or self.exchanges[-1].answer.step != len(ends) - 1:
            return None
        return tuple(b - a for a, b in pairwise([0, *ends]))

    async def rollback(self, position: int) -> None:
        await self._request({"op": "rollback", "position": position})
        while self._ends and self._ends[-1] > position:
            self._ends.pop()
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
        self._outputs: torch.Tensor | None = None
        """The last hop's outputs for the held tokens (what a rewind compares them with)."""
        self.rewinds: list[int] = []
        """Every position the chain was rewound to (``Rewind``), in order."""
        self._mask = torch.ones(batch_size, max_length, dtype=torch.bool)
        self._pending: list[_Pending] = []
        """Spot-checks running in the background, oldest first (``SpotChecker.blocks``)."""

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
        """Run new tokens' hidden states through every hop; the last hop's output.

        First acts on the background spot-checks that finished (``Rewind`` when one caught
        a cheater)."""
        await self._collect()
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
        cheaters: dict[HopSession, SpotCheck] = {}
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
                caught = await self._check(hop, step, inputs, output, attention_mask)
                if caught is not None:
                    cheaters[hop] = caught
                    if pushed:
                        await self._undo_pushed(index, step)
                    wrong = await self._first_wrong(hop.hop, caught, self.position)
                    if wrong is not None:
                        await self._rewind(wrong, cheaters)
                        raise Rewind(wrong, caught)
                    assert caught.replacement is not None  # a CHEATER verdict carries it
                    inputs[hop.hop.end] = caught.replacement.to(hidden.dtype)
                    # later hops run the corrected output as a new step: a server answers a
                    # step id it already ran from its log, even after a rollback
                    self._steps += 1
                    step = self._steps
                    send = True
        self._keep(inputs, attention_mask, tokens)
        self.position += tokens
        for cheater, check in cheaters.items():
            await self._failover(
                self.hops.index(cheater), CaughtCheating(cheater.hop.peer_id, check)
            )
        return inputs[self.hops[-1].hop.end].clone()

    async def _check(
        self,
        hop: HopSession,
        step: int,
        inputs: dict[int, torch.Tensor],
        output: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> SpotCheck | None:
        """Spot-check (maybe) ``hop``'s answer to this step; the check when the hop was
        caught cheating (it is banned, and the check carries the majority's output), else
        None. A check that need not block (``SpotChecker.blocks``) runs in the background
        on a copy of what it needs (``_collect`` acts on it) and gives None."""
        checker = self.checker
        assert checker is not None
        peer = hop.hop.peer_id
        if not checker.draw(peer):
            return None
        blocks = checker.blocks(peer)
        taken = self._take(hop, step, inputs, output, attention_mask, copy=not blocks)
        if not blocks:
            task = asyncio.create_task(self._run_check(taken))
            self._pending.append(_Pending(taken, task, taken.end))
            return None
        result = await self._run_check(taken)
        if result.verdict is not Verdict.CHEATER:
            return None
        await self._convict(taken, result)
        return result

    def _take(
        self,
        hop: HopSession,
        step: int,
        inputs: dict[int, torch.Tensor],
        output: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        copy: bool,
    ) -> _Taken:
        """``hop``'s answer to this step as a check needs it (``copy``: tensors that the
        chain may overwrite later are cloned)."""
        held = self.position
        new = inputs[hop.hop.start]
        history = (new,) if held == 0 else (self._inputs[hop.hop.start][:, :held], new)
        step_mask = (
            torch.ones(new.shape[:2], dtype=torch.bool)
            if attention_mask is None
            else attention_mask.detach().cpu() != 0
        )
        if copy:
            history, output = tuple(h.clone() for h in history), output.clone()
        index = self.hops.index(hop)
        before = self.hops[index - 1] if index > 0 else None
        return _Taken(
            hop,
            step,
            held,
            held + new.shape[1],
            history,
            output,
            torch.cat([self._mask[:, :held], step_mask], dim=1),
            hop.step_lengths(),
            hop.exchanges[-1] if hop.exchanges else None,
            before.exchanges[-1].output if before is not None and before.exchanges else None,
        )

    async def _run_check(self, taken: _Taken) -> SpotCheck:
        assert self.checker is not None
        mask = taken.mask
        return await self.checker.check(
            taken.hop.hop,
            taken.history,
            taken.output,
            mask=None if bool(mask.all()) else mask,
            steps=taken.lengths,
        )

    async def _convict(self, taken: _Taken, result: SpotCheck) -> None:
        """``taken``'s hop was caught cheating: note it, ban its server, drop its other
        checks still running (the majority's output covers their steps), publish
        evidence."""
        assert result.replacement is not None  # a CHEATER verdict carries the majority's
        hop = taken.hop
        peer = hop.hop.peer_id
        _log.warning("hop %s caught cheating at step %d: %s", hop.hop, taken.step, result.reason)
        self.caught.append(result)
        self.chain.ban(peer)
        dropped = [p for p in self._pending if p.taken.hop.hop.peer_id == peer]
        self._pending = [p for p in self._pending if p not in dropped]
        for pending in dropped:
            pending.task.cancel()
        await asyncio.gather(*(p.task for p in dropped), return_exceptions=True)
        await self._accuse(hop, result, taken)

    async def _collect(self) -> None:
        """Act on the background checks that finished. A hop caught cheating is convicted
        (``_convict``) and its other checks dropped; the chain is rewound (``Rewind``) to
        the first held position where it had answered otherwise than the majority (up to
        the end of the checked step), or, when none differs, to the start of the checked
        step, and the cheater failed over if it still serves the chain. A check that
        failed to run is only logged."""
        done = [p for p in self._pending if p.task.done()]
        if not done:
            return
        self._pending = [p for p in self._pending if not p.task.done()]
        convicted: dict[PeerId, tuple[_Pending, SpotCheck]] = {}
        for pending in done:
            error = None if pending.task.cancelled() else pending.task.exception()
            if pending.task.cancelled() or error is not None:
                if error is not None and not isinstance(error, _FAILURES):
                    raise error
                _log.info("background spot-check of %s failed: %s", pending.taken.hop, error)
                continue
            result = pending.task.result()
            if result.verdict is Verdict.CHEATER:
                convicted.setdefault(result.checked, (pending, result))
        if not convicted:
            return
        target, first = self.position, None
        cheaters: dict[HopSession, SpotCheck] = {}
        for pending, result in convicted.values():
            taken = pending.taken
            await self._convict(taken, result)
            upto = min(pending.valid, self.position)
            wrong = await self._first_wrong(taken.hop.hop, result, upto)
            position = min(taken.held, upto) if wrong is None else wrong
            if position < target:
                target, first = position, result
            if taken.hop in self.hops:
                cheaters[taken.hop] = result
        if first is None:
            for cheater, check in cheaters.items():
                await self._failover(
                    self.hops.index(cheater), CaughtCheating(cheater.hop.peer_id, check)
                )
            return
        await self._rewind(target, cheaters)
        raise Rewind(target, first)

    async def settle(self) -> None:
        """Wait for the background spot-checks still running and act on them (as ``step``
        does on those finished when it starts): ``Rewind`` when one caught a cheater."""
        if self._pending:
            await asyncio.wait([p.task for p in self._pending])
        await self._collect()

    def _forget(self, position: int) -> None:
        """The chain goes back to ``position``: the running checks' steps no longer hold
        after it."""
        for pending in self._pending:
            pending.valid = min(pending.valid, position)

    async def _first_wrong(self, hop: Hop, check: SpotCheck, upto: int) -> int | None:
        """The first of the held positions before ``upto`` (at most the end of the checked
        step) where ``hop`` had answered otherwise than the majority of ``check`` (within
        the tolerance of the check: the checked server's precision against the first
        majority server's), or None when every one agrees. A precision or an input no
        longer known gives position 0 (nothing can be trusted)."""
        if upto == 0 or check.corrected is None:
            return None
        boundary = hop.end
        last = self.hops[-1].hop.end
        answered = self._outputs if boundary == last else self._inputs.get(boundary)
        inputs = self._inputs.get(hop.start)
        servers = await self.chain.servers()
        records = [servers.get(p) for p in (check.checked, check.majority[0])]
        checked, reference = [None if r is None else precision_of(r) for r in records]
        tolerance = (
            None if checked is None or reference is None else tolerance_for(checked, reference)
        )
        if (
            answered is None
            or inputs is None
            or checked is None
            or reference is None
            or tolerance is None
        ):
            return 0
        rms, peak = token_discrepancy(
            inputs[:, :upto],
            check.corrected[:, :upto],
            answered[:, :upto],
            rounding=checked.unit_roundoff + reference.unit_roundoff,
        )
        wrong = ((rms > tolerance.rms) | (peak > tolerance.peak)) & self._mask[:, :upto]
        positions = wrong.any(dim=0).nonzero()
        return None if positions.numel() == 0 else int(positions[0])

    async def _rewind(self, position: int, cheaters: dict[HopSession, SpotCheck]) -> None:
        """Roll the whole chain back to ``position`` (a ``Rewind``): every hop but the
        ``cheaters`` forgets the later tokens, then each cheater is failed over, its
        replacement given the first ``position`` kept inputs only."""
        self._forget(position)
        self.position = position
        self.rewinds.append(position)
        _log.warning("rewinding the chain to position %d", position)
        staying = [i for i, h in enumerate(self.hops) if h not in cheaters]
        results = await asyncio.gather(
            *(self.hops[i].rollback(position) for i in staying), return_exceptions=True
        )
        # from the last hop back, so that a hop replaced by several keeps earlier indices
        for index, result in reversed(list(zip(staying, results, strict=True))):
            if isinstance(result, BaseException):
                if not isinstance(result, _FAILURES) or not is_lost(result):
                    raise result
                await self._failover(index, result)
        for cheater, check in cheaters.items():
            await self._failover(
                self.hops.index(cheater), CaughtCheating(cheater.hop.peer_id, check)
            )

    async def _accuse(
        self, hop: HopSession, result: SpotCheck, taken: _Taken | None = None
    ) -> None:
        """Publish evidence against ``hop``'s server when its signed answer to the checked
        step (``taken``'s; None: its last), the inputs of its session's steps and the
        majority's signed answers make it (``accuse``); best effort, bounded in time.
        Material too large for the record is served from here."""
        if taken is None:
            index = self.hops.index(hop)
            before = self.hops[index - 1] if index > 0 else None
            lengths = hop.step_lengths()
            accused = hop.exchanges[-1] if hop.exchanges else None
            pushed = (
                before.exchanges[-1].output if before is not None and before.exchanges else None
            )
            kept = self._inputs.get(hop.hop.start)
            held_before, mask = self.position, self._mask
        else:
            lengths, accused, pushed = taken.lengths, taken.exchange, taken.pushed
            kept = taken.history[0] if taken.held else None
            held_before, mask = taken.held, taken.mask
        if lengths is None or accused is None:
            _log.info("no evidence against %s: its answer to the step is not at hand", hop.hop)
            return
        data = accused.input
        if data is None and pushed is not None and digest(pushed) == accused.answer.input_digest:
            data = pushed  # the previous server pushed its output
        held = sum(lengths[:-1])
        if data is None or held > held_before or (held and kept is None):
            _log.info("no evidence against %s: its inputs are not at hand", hop.hop)
            return
        earlier = (
            []
            if kept is None
            else encode_steps(
                kept[:, :held],
                lengths[:-1],
                hop.hop.dtype,
                self.chain.compression,
                mask=mask[:, :held],
            )
        )
        inputs = [*earlier, data]
        host = self.chain.host
        witnesses = [a for a in result.signed if a.signer in result.majority]
        evidence = accuse(
            host_identity(host),
            accused,
            witnesses,
            inputs=inputs,
            addrs=[str(a) for a in host.addrs],
        )
        if evidence is None:
            return
        if not evidence.inline:
            if not evidence.addrs:
                _log.info("no evidence against %s: too large, and nobody can dial us", hop.hop)
                return
            desk_of(host).hold(evidence, inputs, accused.output)
        if await publish(self.chain.dht, evidence):
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
        """Remember this step's inputs of every hop, for replays, and the last hop's
        outputs, for rewinds."""
        span = slice(self.position, self.position + tokens)
        for hop in self.hops:
            state = inputs[hop.hop.start]
            kept = self._inputs.get(hop.hop.start)
            if kept is None:
                kept = state.new_empty(self.batch_size, self.max_length, *state.shape[2:])
                self._inputs[hop.hop.start] = kept
            kept[:, span] = state
        output = inputs[self.hops[-1].hop.end]
        if self._outputs is None:
            self._outputs = output.new_empty(self.batch_size, self.max_length, *output.shape[2:])
        self._outputs[:, span] = output
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
        self._forget(position)
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
        """End every hop's session; background checks still running are cancelled."""
        pending, self._pending = self._pending, []
        for check in pending:
            check.task.cancel()
        await asyncio.gather(*(p.task for p in pending), return_exceptions=True)
        await asyncio.gather(*(h.close() for h in self.hops), return_exceptions=True)


def _backoff_s(chain: RemoteChain, attempt: int) -> float:
    limits = chain.limits
    return min(limits.failover_backoff_max_s, limits.failover_backoff_s * 2**attempt)
