"""``DistributedModelForCausalLM``: a Hugging Face causal LM whose blocks run on the swarm.

The client holds the embeddings, final norm and LM head (``load_model_ends``); its
``forward`` embeds locally, runs the hidden states through a chain of servers and computes
the logits locally, so ``generate()`` works as for any transformers model: greedy,
sampling with temperature / top-k / top-p, batches with left padding and attention masks.

Generation runs in an inference session (``model.inference_session(max_length=...)``,
opened by ``generate`` itself when none is open): each server keeps the attention cache, and
each forward sends only the tokens the session does not hold yet. The session remembers the
tokens it was given, so successive ``generate`` calls inside one session continue it, and an
input that departs from them (a changed prompt, a reordered beam) rolls the servers back to
the common prefix: the result is always what the whole model would give.

Spot-checks (``_spotcheck``): a share ``spot_check_rate`` of every hop's steps (1.0:
paranoid) is re-run on independent servers; a hop caught cheating by a check that blocks
its step (paranoid, or a server on probation) is banned, its output replaced by the
majority's before any token is drawn from it, and its blocks failed over.
Outcomes go to the model's ``ReputationBook`` (``book``), kept at ``reputation_path``
across runs when one is given.

Checks of servers off probation at the ordinary rate run in the background
(``SpotCheckSettings.background``): the token does not wait for them, a cheater one
catches rewinds the generation (below), and ``generate`` waits for the checks still
running before it returns (``RemoteInferenceSession.settle``), so that its tokens never
come from a cheater a started check catches; a streamer's ``end()`` comes after that.

Rewinds: a hop caught at step k may have corrupted earlier steps no check covered. The
session compares its earlier answers with the majority's output for its whole prefix; from
the first position p that disagrees, every later state is suspect, so the chain is rolled
back to p (``Rewind``) and ``generate`` draws every token after the first p + 1 again
(greedy gives the honest run's tokens; sampling draws anew), with the same total of new
tokens, at most ``ClientLimits.max_rewinds`` times per call (then ``RewindsExhausted``).
A streamer has already been handed the tokens drawn after p: ``generate`` calls its
``rewound(length)`` method, if it has one (``TokenClock`` does, and ``swarm generate``
prints a notice), with the length of the sequence kept, then goes on with ``put`` of the
new tokens only and one ``end()``. After a rewind, ``sequences`` of a ``generate`` output
is whole but per-step outputs (``scores``, ``logits``) cover the tokens drawn since the
last rewind only; in a batch, a row that had finished before p is not known to be
finished again (it may go on past its end-of-sequence token).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn import functional
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from security import PeerId, ReputationBook
from transport import Multiaddr

from ._announce import ServerRecord
from ._checkpoint import Checkpoint
from ._client_chain import ChainTrace, Hop, RemoteChain
from ._client_errors import RewindsExhausted
from ._client_runtime import SwarmClient
from ._client_session import ChainSession, Failover, Rewind
from ._ends import ModelEnds, load_model_ends
from ._errors import TooLong
from ._manifest import Manifest, load_manifest
from ._server_limits import ClientLimits
from ._spotcheck import DEFAULT_RATE, SpotCheck, SpotChecker, SpotCheckSettings
from ._wire import Compression
from .families import FAMILIES

_log = logging.getLogger("model_shards.client")


def _checkable(config: PretrainedConfig) -> bool:
    """Whether servers of this model can be spot-checked (``ModelFamily.spot_checkable``);
    a warning says why not."""
    family = FAMILIES.get(config.model_type)
    if family is None or family.spot_checkable:
        return True
    _log.warning(
        "spot-checks are off for %s models: honest servers of a mixture of experts can "
        "disagree by more than any tolerance (a rounding difference flips an expert)",
        config.model_type,
    )
    return False


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM of the swarm: local ends, remote blocks. Build with ``from_pretrained``."""

    base_model_prefix = "swarm"
    _owns_client = False
    """Whether ``close`` closes the swarm client (it does when ``from_pretrained`` made it)."""

    def __init__(
        self,
        config: PretrainedConfig,
        ends: ModelEnds,
        manifest: Manifest,
        client: SwarmClient,
        chain: RemoteChain,
        *,
        checker: SpotChecker | None = None,
        book: ReputationBook | None = None,
        reputation_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(config)
        self.post_init()
        self.ends = ends
        self.manifest = manifest
        self.client = client
        self.chain = chain
        self.checker = checker
        """Spot-checks the steps of inference sessions (None: checks off)."""
        self.book = ReputationBook() if book is None else book
        """What this client learnt of the servers (saved at ``reputation_path`` on close)."""
        self._reputation_path = reputation_path
        self._session: RemoteInferenceSession | None = None

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path_or_name: str | os.PathLike[str],
        *,
        initial_peers: Iterable[Multiaddr | str],
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        compression: Compression | str = Compression.NONE,
        limits: ClientLimits | None = None,
        client: SwarmClient | None = None,
        spot_check_rate: float = DEFAULT_RATE,
        reputation_path: str | os.PathLike[str] | None = None,
    ) -> DistributedModelForCausalLM:
        """Load the model's ends from a local checkpoint and join the swarm as a client.

        ``path_or_name`` is a checkpoint directory or a Hub name already in the local cache
        (never downloaded); the model is found in the swarm by its manifest's id.
        ``initial_peers`` are multiaddrs of any peers of the swarm. ``compression`` applies
        to hidden states on the wire (``none`` keeps results exact). Pass ``client`` to
        share one ``SwarmClient`` between models (it is then not closed by ``close``).
        ``spot_check_rate``: the share of each hop's steps re-run elsewhere and compared
        (0 disables the checks, 1.0 checks every step); ``reputation_path``: a file keeping
        the client's reputation book across runs (read here, written by ``close``).
        """
        limits = limits or ClientLimits()
        settings = SpotCheckSettings(rate=spot_check_rate)
        book = ReputationBook() if reputation_path is None else ReputationBook.load(reputation_path)
        checkpoint = Checkpoint.open(path_or_name, cache_dir=cache_dir)
        manifest = load_manifest(checkpoint)
        ends = load_model_ends(checkpoint, dtype=dtype, device=device, manifest=manifest)
        owned = client is None
        runtime = client or SwarmClient(initial_peers, limits=limits, book=book)
        chain = RemoteChain(
            runtime.host,
            runtime.dht,
            manifest.model_id,
            manifest.num_blocks,
            limits=limits,
            compression=Compression(compression),
            book=book,
        )
        checker = (
            SpotChecker(chain, settings=settings, book=book)
            if settings.rate > 0 and _checkable(checkpoint.config)
            else None
        )
        model = cls(
            checkpoint.config,
            ends,
            manifest,
            runtime,
            chain,
            checker=checker,
            book=book,
            reputation_path=reputation_path,
        )
        model._owns_client = owned
        try:
            model.generation_config = GenerationConfig.from_pretrained(checkpoint.path)
        except OSError:
            model.generation_config = GenerationConfig.from_model_config(checkpoint.config)
        return model.eval()

    def close(self) -> None:
        """Close any open session and, unless it was shared, the swarm client."""
        if self._session is not None:
            self._session.close()
        if self._reputation_path is not None:
            self.book.save(self._reputation_path)
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transformers plumbing ---------------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.ends.embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.ends.lm_head

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Every step gets the whole sequence: the session sends only what servers lack."""
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    # -- the swarm ---------------------------------------------------------------------------

    @property
    def session(self) -> RemoteInferenceSession | None:
        """The open inference session (``generate`` opens one for its call), if any."""
        return self._session

    def servers(self) -> dict[PeerId, ServerRecord]:
        """The servers the swarm announces for this model (read from the DHT now)."""
        return self.client.run(self.chain.servers(refresh=True))

    @contextmanager
    def inference_session(self, *, max_length: int) -> Iterator[RemoteInferenceSession]:
        """Keep one session on the servers, for up to ``max_length`` tokens per sequence,
        across ``forward`` and ``generate`` calls inside the ``with`` block."""
        if self._session is not None:
            raise RuntimeError("an inference session is already open on this model")
        session = RemoteInferenceSession(self, max_length)
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            session.close()

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate``, inside an inference session sized for the call
        (the open one, if any), drawn again from the first corrupted position after each
        rewind (module doc)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None:
            raise ValueError("generate needs input_ids: the servers' sessions work on tokens")
        config = kwargs.get("generation_config") or self.generation_config
        new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if new_tokens is not None:
            max_length = ids.shape[-1] + new_tokens
        else:
            max_length = kwargs.get("max_length", config.max_length)
        if self._session is not None:
            return self._rewinding(ids, max_length, args, kwargs)
        with self.inference_session(max_length=max_length):
            return self._rewinding(ids, max_length, args, kwargs)

    def _rewinding(
        self, ids: torch.Tensor, max_length: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """``GenerationMixin.generate`` of ``ids`` up to ``max_length`` tokens in all,
        started again from the kept tokens after each ``Rewind``."""
        prompt = ids.shape[-1]
        kwargs = {k: v for k, v in kwargs.items() if k != "input_ids"}
        streamer = kwargs.get("streamer")
        config = kwargs.get("generation_config") or self.generation_config
        min_new = kwargs.get("min_new_tokens", config.min_new_tokens)
        limit = self.chain.limits.max_rewinds
        rewinds = 0
        if streamer is not None:
            kwargs["streamer"] = _Resumed(streamer, prompt=False)
        while True:
            try:
                output = super().generate(ids, *args, **kwargs)
                if self._session is not None:
                    self._session.settle()
            except _Rewound as signal:
                rewinds += 1
                if rewinds > limit:
                    raise RewindsExhausted(limit, signal) from signal
                keep = max(signal.position + 1, prompt)
                ids = signal.input_ids[:, :keep].to(ids.device)
                kwargs["attention_mask"] = signal.attention_mask[:, :keep].to(ids.device).long()
                kwargs["max_new_tokens"] = max_length - keep
                kwargs.pop("max_length", None)
                if min_new:
                    kwargs["min_new_tokens"] = max(0, min_new - (keep - prompt))
                if streamer is not None:
                    rewound = getattr(streamer, "rewound", None)
                    if rewound is not None:
                        rewound(keep)
                    kwargs["streamer"] = _Resumed(streamer, prompt=True)
                continue
            if streamer is not None:
                streamer.end()
            return output

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of the tokens given (inside a session: of the tokens it did not hold).

        Positions always follow the attention mask (as ``generate`` numbers them).
        Inside a session a forward may raise ``Rewind`` (a cheater caught late: the session
        then holds the first ``position`` tokens; ``generate`` handles it, module doc).
        Outside a session the call is stateless and differentiable: gradients flow to
        ``inputs_embeds`` through the servers' backward.
        """
        if position_ids is not None:
            raise ValueError(
                "position_ids are derived from attention_mask on the servers; do not pass them"
            )
        if self._session is not None:
            if input_ids is None or labels is not None:
                raise ValueError("inside an inference session, pass input_ids and no labels")
            hidden = self._session.advance(input_ids, attention_mask)
        else:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("pass exactly one of input_ids and inputs_embeds")
            embeds = self.ends.embed(input_ids) if inputs_embeds is None else inputs_embeds
            hidden = self._remote_forward(embeds, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.ends.logits(hidden)
        loss = None
        if labels is not None:
            loss = functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _remote_forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:
            return _RemoteBlocks.apply(hidden, attention_mask, self)
        output = self.client.run(self.chain.forward(hidden.detach().cpu(), attention_mask))
        return output.to(hidden.device)


class _Rewound(Rewind):
    """A ``Rewind`` seen by ``RemoteInferenceSession.advance``, with the ids and mask of
    the forward it broke (``generate`` keeps their first tokens and goes on)."""

    def __init__(self, rewind: Rewind, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__(rewind.position, rewind.check)
        self.input_ids = input_ids
        self.attention_mask = mask


class _Resumed:
    """The user's streamer inside ``generate``: its ``end`` waits for the background
    spot-checks (``_rewinding`` calls it once they found no cheater); after a rewind
    (``prompt``) the retry's prompt, tokens the streamer was handed already, is not passed
    on."""

    def __init__(self, streamer: Any, *, prompt: bool) -> None:
        self._streamer = streamer
        self._prompt = prompt

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        self._streamer.put(value)

    def end(self) -> None:
        """Generation stopped: ``_rewinding`` ends the user's streamer once it is final."""


class _RemoteBlocks(torch.autograd.Function):
    """The swarm's blocks as one differentiable function of the hidden states."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        model: DistributedModelForCausalLM,
    ) -> torch.Tensor:
        trace: ChainTrace = model.client.run(
            model.chain.trace(hidden.detach().cpu(), attention_mask)
        )
        ctx.trace, ctx.model, ctx.device = trace, model, hidden.device
        return trace.output.to(hidden.device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        model: DistributedModelForCausalLM = ctx.model
        grad = model.client.run(model.chain.backward(ctx.trace, grad_output.detach().cpu()))
        return grad.to(ctx.device), None, None


class RemoteInferenceSession:
    """One generation's sessions on the servers, and the tokens they hold.

    Opened on the first forward (which fixes the batch size); ``position`` tokens are held.
    """

    def __init__(self, model: DistributedModelForCausalLM, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model = model
        self.max_length = max_length
        self._chain: ChainSession | None = None
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._closed = False

    @property
    def position(self) -> int:
        return 0 if self._ids is None else self._ids.shape[1]

    @property
    def route(self) -> list[str]:
        """The chain's hops as ``peer[start:end]`` (empty until the first forward)."""
        return [] if self._chain is None else [str(hop) for hop in self._chain.route]

    @property
    def hops(self) -> list[Hop]:
        """The chain's hops now (empty until the first forward; failovers change them)."""
        return [] if self._chain is None else self._chain.route

    @property
    def chain(self) -> ChainSession | None:
        """The sessions along the chain (None until the first forward): their signed
        answers (``HopSession.exchanges``) and published evidence (``evidence``)."""
        return self._chain

    @property
    def failovers(self) -> list[Failover]:
        """The hops replaced so far because their server failed (empty until one did)."""
        return [] if self._chain is None else list(self._chain.failovers)

    @property
    def caught(self) -> list[SpotCheck]:
        """The spot-checks that caught a hop cheating so far (its steps were corrected)."""
        return [] if self._chain is None else list(self._chain.caught)

    @property
    def rewinds(self) -> list[int]:
        """Every position the chain was rewound to after catching a cheater, in order."""
        return [] if self._chain is None else list(self._chain.rewinds)

    def advance(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The last block's output for the tokens of ``input_ids`` the servers lack."""
        if self._closed:
            raise RuntimeError("this inference session is closed")
        input_ids = input_ids.detach().cpu()
        batch, length = input_ids.shape
        mask = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.detach().cpu() != 0
        )
        if length > self.max_length:
            raise TooLong(
                f"{length} tokens exceed the inference session's max_length={self.max_length}"
            )
        model = self.model
        if self._chain is None:
            self._chain = model.client.run(
                ChainSession.open(
                    model.chain,
                    batch_size=batch,
                    max_length=self.max_length,
                    checker=model.checker,
                )
            )
        elif self._ids is not None and batch != self._ids.shape[0]:
            raise ValueError(f"the session holds a batch of {self._ids.shape[0]}, not {batch}")
        keep = min(self._common_prefix(input_ids, mask), length - 1)
        if keep < self.position:
            model.client.run(self._chain.rollback(keep))
        new_ids = input_ids[:, keep:]
        hidden = model.ends.embed(new_ids).detach().cpu()
        try:
            output = model.client.run(self._chain.step(hidden, mask[:, keep:]))
        except Rewind as rewind:
            held = rewind.position
            self._ids, self._mask = input_ids[:, :held], mask[:, :held]
            raise _Rewound(rewind, input_ids, mask) from rewind
        self._ids, self._mask = input_ids, mask
        return output.to(model.ends.device)

    def settle(self) -> None:
        """Wait for the background spot-checks still running (``ChainSession.settle``): a
        cheater one catches rewinds the session as a forward does (``Rewind``, with the
        tokens held)."""
        if self._closed or self._chain is None or self._ids is None or self._mask is None:
            return
        try:
            self.model.client.run(self._chain.settle())
        except Rewind as rewind:
            ids, mask = self._ids, self._mask
            self._ids, self._mask = ids[:, : rewind.position], mask[:, : rewind.position]
            raise _Rewound(rewind, ids, mask) from rewind

    def _common_prefix(self, input_ids: torch.Tensor, mask: torch.Tensor) -> int:
        if self._ids is None or self._mask is None:
            return 0
        n = min(self.position, input_ids.shape[1])
        same = (self._ids[:, :n] == input_ids[:, :n]) & (self._mask[:, :n] == mask[:, :n])
        return int(torch.cumprod(same.all(dim=0).int(), dim=0).sum())

    def close(self) -> None:
        """End the servers' sessions (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._chain is not None:
            self.model.client.run(self._chain.close())

    def __enter__(self) -> RemoteInferenceSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
