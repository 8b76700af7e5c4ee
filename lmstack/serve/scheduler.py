"""The serving engine: continuous batching over a paged KV cache.

Every ``step()`` builds one batch from a token budget (``max_batch_tokens``):

    1. running sequences first, oldest first: one token each when decoding, the next chunk of the
       prompt when still prefilling (so a long prompt is spread over steps and never stalls decoders);
    2. then waiting requests, while the budget and ``max_batch`` allow: the longest run of their
       prompt's full blocks already in the prefix cache is reused, the rest is prefilled in chunks.

A sequence that needs a block when none is free preempts the youngest running one (its blocks are
freed; it is recomputed later from its tokens, mostly from the prefix cache). All scheduled tokens go
through the model as one packed row (``PackedBatch``); each sequence whose tokens are all computed
gets its next token from its own sampler. Requests join and leave at every step.

Greedy decoding gives the tokens ``lmstack.generate`` gives for the same prompt, whatever else runs.
"""

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.serve.paged_kv import BlockAllocator, OutOfBlocks, PackedBatch, PagedKVPool, block_digest
from lmstack.serve.sampling import Sample, SamplingParams, choose


@dataclass
class Sequence:
    """One request in flight: its tokens (prompt, then generated), its blocks and progress."""

    id: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys/values are in the cache
    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)  # of the full blocks computed so far
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]


@dataclass
class StepOutput:
    """What one step produced for one sequence: a token (None when it ended without one) and, when the
    sequence ended, why: "stop" (end-of-sequence or a stop token), "length", or "cancelled"."""

    seq_id: int
    sample: Sample | None
    finish_reason: str | None = None


class Engine:
    """Continuous-batching engine for a decoder model (``hidden_states`` + ``lm_head``).

    Args:
        model: a Decoder in eval mode.
        num_blocks, block_size: the KV pool (num_blocks * block_size token slots in all).
        max_batch: running sequences at most.
        max_batch_tokens: tokens per step at most (decode tokens plus prefill chunks).
        eos_token_ids: tokens that end a request (default: the model config's).
        prefix_caching: reuse cached blocks of identical prompt prefixes.
    """

    def __init__(self, model: nn.Module, num_blocks: int = 512, block_size: int = 16, max_batch: int = 32,
                 max_batch_tokens: int = 256, eos_token_ids: list[int] | None = None,
                 prefix_caching: bool = True) -> None:
        if max_batch < 1 or max_batch_tokens < 1:
            raise ConfigError(f"max_batch={max_batch} and max_batch_tokens={max_batch_tokens} must be >= 1")
        self.model = model
        self.pool = PagedKVPool.for_model(model, num_blocks, block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.block_size, self.max_batch, self.max_batch_tokens = block_size, max_batch, max_batch_tokens
        self.prefix_caching = prefix_caching
        if eos_token_ids is None:
            eos = getattr(model.config, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = set(eos_token_ids)
        self.context = getattr(model.config, "context_limit", None)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self.preemptions = 0
        self.pending: list[StepOutput] = []  # cancellations, reported by the next step

    # ---- requests ---------------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams) -> int:
        """Queue a request; returns its sequence id. Raises ConfigError when it can never fit."""
        self.check(prompt, params)
        seq = Sequence(next(self._ids), list(prompt), params, tokens=list(prompt))
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self.sequences[seq.id] = seq
        self.waiting.append(seq)
        return seq.id

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ConfigError, naming the problem, for a request this engine could never run."""
        if not prompt:
            raise ConfigError("empty prompt: a request needs at least one token")
        if params.max_tokens < 1:
            raise ConfigError(f"max_tokens={params.max_tokens} must be >= 1")
        total = len(prompt) + params.max_tokens
        if self.context is not None and len(prompt) >= self.context:
            raise ConfigError(f"the prompt has {len(prompt)} tokens; the model's context is {self.context}")
        if -(-min(total, self.context or total) // self.block_size) > self.allocator.num_blocks:
            raise ConfigError(f"{total} tokens need more KV blocks than the pool's {self.allocator.num_blocks}")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ConfigError(f"token ids must be in [0, {vocab}): the prompt holds {min(prompt)}..{max(prompt)}")

    def cancel(self, seq_id: int) -> None:
        """Stop a request now and free its blocks (a client that went away); unknown ids are ignored."""
        seq = self.sequences.get(seq_id)  # a sequence leaves this map when it ends
        if seq is not None:
            self._finish(seq, "cancelled")
            self.pending.append(StepOutput(seq.id, None, "cancelled"))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending)

    # ---- scheduling -------------------------------------------------------------------------------
    def _ensure_blocks(self, seq: Sequence, n_new: int) -> bool:
        """Give ``seq`` blocks for positions up to computed + n_new; False when the pool ran out."""
        needed = -(-(seq.computed + n_new) // self.block_size) - len(seq.blocks)
        try:
            for _ in range(needed):
                seq.blocks.append(self.allocator.allocate())
        except OutOfBlocks:
            return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first; it will be recomputed from its tokens."""
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.digests, seq.computed = [], [], 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _admit_prefix(self, seq: Sequence) -> None:
        """Reuse the cached blocks of the longest known prefix (never the block of the last token: its
        logits must be computed)."""
        if not self.prefix_caching:
            return
        digests = self._chain(seq.tokens, [], (len(seq.tokens) - 1) // self.block_size)
        seq.blocks = self.allocator.lookup(digests)
        seq.digests = digests[:len(seq.blocks)]
        seq.computed = len(seq.blocks) * self.block_size
        if not seq.generated:
            seq.cached_tokens = seq.computed

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The (sequence, new tokens) pairs of the next step."""
        budget, batch, preempted = self.max_batch_tokens, [], False
        for seq in list(self.running):
            if seq not in self.running:  # preempted by an older sequence in this loop
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            if n <= 0:
                continue
            while not self._ensure_blocks(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq in self.running:
                batch.append((seq, n))
                budget -= n
            if budget == 0:
                break
        while self.waiting and budget > 0 and len(self.running) < self.max_batch and not preempted:
            seq = self.waiting[0]
            self._admit_prefix(seq)
            n = min(len(seq.tokens) - seq.computed, budget)
            if not self._ensure_blocks(seq, n):
                self.allocator.free(seq.blocks)
                seq.blocks, seq.digests, seq.computed = [], [], 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    # ---- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Run one batch; return the tokens it produced and the sequences that ended."""
        outputs, self.pending = self.pending, []
        batch = self.schedule()
        if not batch:
            return outputs
        ids, positions = [], []
        for seq, n in batch:
            ids.extend(seq.tokens[seq.computed:seq.computed + n])
            positions.extend(range(seq.computed, seq.computed + n))
        device = self.pool.k.device
        packed = PackedBatch(self.pool, [(seq.blocks, seq.computed, n) for seq, n in batch])
        hidden = self.model.hidden_states(torch.tensor([ids], device=device), kv_cache=packed,
                                          position_ids=torch.tensor([positions], device=device))[0]
        ready, last, offset = [], [], 0
        for seq, n in batch:
            seq.computed += n
            offset += n
            self._register_blocks(seq)
            if seq.computed == len(seq.tokens):  # all its tokens are in: it has next-token logits
                ready.append(seq)
                last.append(offset - 1)
        if ready:
            logits = self.model.lm_head(hidden[torch.tensor(last, device=device)]).float()
            for seq, row in zip(ready, logits):
                outputs.append(self._advance(seq, row))
        return outputs

    def _register_blocks(self, seq: Sequence) -> None:
        """Name the blocks that just became full, so later prompts with the same tokens can reuse them."""
        if not self.prefix_caching:
            return
        named = len(seq.digests)
        seq.digests = self._chain(seq.tokens, seq.digests, seq.computed // self.block_size)
        for b in range(named, len(seq.digests)):
            self.allocator.register(seq.blocks[b], seq.digests[b])

    def _chain(self, tokens: list[int], digests: list[bytes], n_blocks: int) -> list[bytes]:
        """``digests`` extended to the first ``n_blocks`` full blocks of ``tokens``, each chained to its parent."""
        out, size = list(digests), self.block_size
        for b in range(len(out), n_blocks):
            out.append(block_digest(out[-1] if out else None, tokens[b * size:(b + 1) * size]))
        return out

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> StepOutput:
        sample = choose(logits, seq.generated, seq.params, seq.generator)
        seq.tokens.append(sample.token)
        reason = None
        at_eos = sample.token in self.eos_token_ids and not seq.params.ignore_eos
        if at_eos or sample.token in seq.params.stop_token_ids:
            reason = "stop"
        elif len(seq.generated) >= seq.params.max_tokens or (self.context and len(seq.tokens) >= self.context):
            reason = "length"
        if reason:
            self._finish(seq, reason)
        return StepOutput(seq.id, sample, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.finish_reason = [], reason
        del self.sequences[seq.id]

    def finish(self, seq_id: int, reason: str = "stop") -> None:
        """End a request early (a stop string matched in its text) and free its blocks."""
        seq = self.sequences.get(seq_id)
        if seq is not None:
            self._finish(seq, reason)

    def run_to_completion(self) -> dict[int, list[int]]:
        """Step until every queued request ended; returns each sequence's generated ids (tests, batch jobs)."""
        results: dict[int, list[int]] = {sid: [] for sid in self.sequences}
        while self.has_work:
            for out in self.step():
                if out.sample is not None:
                    results.setdefault(out.seq_id, []).append(out.sample.token)
        return results
