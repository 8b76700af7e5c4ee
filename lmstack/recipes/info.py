"""`lmstack info DIR`: describe a Hugging Face-format checkpoint without loading its weights."""

from dataclasses import dataclass
from pathlib import Path

from lmstack.config import field
from lmstack.models import inspect_hf
from lmstack.models.summary import format_parameter_table


@dataclass
class InfoConfig:
    """Describe a checkpoint: family, parameter count, dtype, context length, per-module parameters."""

    path: Path = field(help="checkpoint directory (config.json + *.safetensors)", positional=True)


def describe(path: Path) -> str:
    """The report `lmstack info` prints. Reads config.json and the safetensors headers only."""
    checkpoint = inspect_hf(path)
    model, cfg = checkpoint.model, checkpoint.model.config
    params = sum(p.numel() for p in model.parameters())
    attention = f"{cfg.n_heads} heads, {cfg.n_kv_heads} key/value heads, head_dim {cfg.head_dim}"
    if cfg.sliding_window is not None:
        attention += f", sliding window {cfg.sliding_window}"
    position = _describe_positions(cfg)
    files = sorted({info.file.name for info in checkpoint.tensors.values()})
    lines = [
        f"checkpoint      {checkpoint.directory}",
        f"family          {checkpoint.family.model_type} ({checkpoint.family.architecture})",
        f"parameters      {params:,} ({params / 1e6:.1f}M)",
        f"dtype           {str(checkpoint.stored_dtype).removeprefix('torch.')}",
        f"context length  {cfg.max_seq_len:,} tokens",
        f"shape           {cfg.n_layers} layers, width {cfg.dim}, feed-forward {cfg.ffn_dim} ({cfg.mlp}, {cfg.activation}), "
        f"vocabulary {cfg.vocab_size:,}",
        f"attention       {attention}",
        f"positions       {position}",
        f"norm            {cfg.norm} (eps {cfg.norm_eps:g}); embeddings {'tied' if cfg.tie_embeddings else 'untied'}",
        f"files           {', '.join(files)}",
        "",
        format_parameter_table(model),
    ]
    return "\n".join(lines)


def _describe_positions(cfg) -> str:
    """e.g. "rope (theta 500000, llama3 scaling x32)" or "learned"."""
    if cfg.position != "rope":
        return cfg.position
    scaling = f", {cfg.rope_scaling.kind} scaling x{cfg.rope_scaling.factor:g}" if cfg.rope_scaling else ""
    return f"rope (theta {cfg.rope_theta:g}{scaling})"


def run(cfg: InfoConfig) -> None:
    print(describe(cfg.path))
