"""Pipeline parallelism: the decoder's layers split into ``pp`` contiguous stages, one per rank, run by
``torch.distributed.pipelining``'s GPipe or 1F1B schedule over micro-batches.

    stage 0: embed_tokens (+ positions), layers [0, a)        stage 1: layers [a, b)      ...
    stage pp-1: layers [z, n), norm, lm_head -> loss

A stage keeps the full model's parameter names (``layers.5.attn.q_proj.weight`` stays that on whichever
rank holds layer 5), so sharded checkpoints move between pipeline and other layouts. GPipe runs every
micro-batch's forward, then every backward (activations of all micro-batches held); 1F1B alternates after
a warm-up, holding at most ``pp`` micro-batches' activations. With m micro-batches the idle "bubble" is
(pp - 1) / (m + pp - 1) of a step either way.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.nn.masks import AttentionMask
from lmstack.nn.positions import alibi_slopes


def stage_layers(n_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of ``pp`` stages, as even as possible (earlier stages take the remainder).

    Raises:
        ConfigError: more stages than layers.
    """
    if pp > n_layers:
        raise ConfigError(f"parallel.pp={pp} pipeline stages but the model has {n_layers} layers; each stage needs "
                          "at least one (lower parallel.pp)")
    base, extra = divmod(n_layers, pp)
    bounds = [0]
    for s in range(pp):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


class DecoderStage(nn.Module):
    """Layers ``layers`` of a Decoder; the embedding on the first stage, the final norm and head on the last.

    forward: the first stage takes input ids (B, T); the others hidden states (B, T, C). The last stage
    returns logits (B, T, V), the others hidden states (B, T, C). Causal attention over the whole row,
    positions 0..T-1 (packed pretraining blocks).
    """

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.config, self.first, self.last = model.config, first, last
        if first and last:
            raise ConfigError("a pipeline needs at least two stages")
        self.embed_tokens = model.embed_tokens if first else None
        self.embed_positions = model.embed_positions if first else None
        self.rotary = model.rotary
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        if self.first:
            x = self.embed_tokens(x)
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        if self.first:
            if self.embed_positions is not None:
                x = x + self.embed_positions(positions).to(x.dtype)
            if self.training and config.dropout > 0:
                x = F.dropout(x, config.dropout, training=True)
        slopes = alibi_slopes(config.n_heads).to(x.device) if config.position == "alibi" else None
        mask = AttentionMask(causal=True, alibi_slopes=slopes)
        rotary = self.rotary(positions) if self.rotary is not None else None
        for layer in self.layers.values():
            x = layer(x, mask, rotary)
        return self.lm_head(self.norm(x)) if self.last else x


def check_pipeline(model: nn.Module) -> None:
    """Refuse models a pipeline cannot split here, naming why."""
    config = model.config
    if not hasattr(model, "layers") or not hasattr(model, "lm_head"):
        raise ConfigError(f"pipeline parallelism splits decoder language models; got {type(model).__name__}")
    if getattr(config, "moe", None) is not None:
        raise ConfigError("pipeline parallelism does not carry a mixture of experts' router losses between stages; "
                          "train MoE models with data parallelism (parallel.pp 1)")
    if config.tie_embeddings:
        raise ConfigError("pipeline parallelism puts the embedding and the LM head on different ranks, so a model "
                          "that ties them (tie_embeddings) cannot be split; untie them or use parallel.pp 1")


def build_schedule(stage_module: DecoderStage, stage_index: int, n_stages: int, device: torch.device,
                   group, kind: str, n_microbatches: int, loss_fn):
    """The torch.distributed.pipelining schedule that runs ``stage_module`` as stage ``stage_index``."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(stage_module, stage_index, n_stages, device, group=group)
    schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[kind]
    return schedule(stage, n_microbatches=n_microbatches, loss_fn=loss_fn)


class PipelineForward(nn.Module):
    """Inference through the stages, for held-out evaluation: every rank of the pipeline gets the logits.

    Each stage runs the whole batch and sends its output to the next; the last stage broadcasts the logits
    (B, T, V). No micro-batches (an evaluation batch may be smaller than the training one)."""

    def __init__(self, stage_module: DecoderStage, stage_index: int, n_stages: int, group) -> None:
        super().__init__()
        self.stage_module, self.stage_index, self.n_stages, self.group = stage_module, stage_index, n_stages, group
        self.config = stage_module.config

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        config, device = self.config, input_ids.device
        x = input_ids
        if self.stage_index > 0:
            x = torch.empty(B, T, config.dim, device=device)
            dist.recv(x, self._peer(self.stage_index - 1), group=self.group)
        y = self.stage_module(x)
        if self.stage_index < self.n_stages - 1:
            dist.send(y.contiguous(), self._peer(self.stage_index + 1), group=self.group)
            y = torch.empty(B, T, config.vocab_size, device=device)
        dist.broadcast(y, self._peer(self.n_stages - 1), group=self.group)
        return y
