"""What `lmstack pretrain` takes (the schema of configs/pretrain/*.yaml)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import check_seed, field
from lmstack.parallel.config import ParallelConfig
from lmstack.train.config import TrainConfig


@dataclass
class MoESection:
    """Mixture-of-experts feed-forward layers (lmstack.nn.moe): each unset key keeps the preset's value (or
    lmstack.models.MoEConfig's default); setting num_experts on a dense preset makes it a mixture."""

    num_experts: int | None = field(None, help="experts per MoE layer (default: the preset's; none: dense)")
    top_k: int | None = field(None, help="experts each token is sent to (default 2)")
    expert_dim: int | None = field(None, help="hidden width of each expert (default: model.ffn_dim)")
    every: int | None = field(None, help="every n-th layer is an MoE layer (default 1: all)")
    capacity_factor: float | None = field(None, help="Switch capacity while training: at most factor * tokens * "
                                          "top_k / experts per expert, the rest dropped (default: no limit)")
    aux_loss_coef: float | None = field(None, help="weight of the load-balancing loss (default 0.01)")
    z_loss_coef: float | None = field(None, help="weight of the router z-loss (default 0)")
    router_jitter: float | None = field(None, help="multiplicative input jitter while training (default 0)")


@dataclass
class ModelSection:
    """The model: a preset, or a Hugging Face directory to continue pretraining, with size overrides."""

    preset: str = field("tiny-gpt2", help="architecture preset (see lmstack.models.preset_names())")
    from_hf: Path | None = field(None, help="continue pretraining this Hugging Face directory instead of a preset")
    dim: int | None = field(None, help="model width (default: the preset's)")
    n_layers: int | None = field(None, help="number of blocks")
    n_heads: int | None = field(None, help="attention heads")
    n_kv_heads: int | None = field(None, help="key/value heads (grouped-query attention)")
    ffn_dim: int | None = field(None, help="feed-forward hidden width")
    max_seq_len: int | None = field(None, help="context length")
    dropout: float | None = field(None, help="dropout while training")
    vocab_size: int | None = field(None, help="embedding rows (default: the tokenizer's size; a larger one "
                                   "leaves ids no text maps to, which sampling could then produce)")
    moe: MoESection = field(default_factory=MoESection, help="mixture of experts")


@dataclass
class TokenizerSection:
    """The tokenizer: an existing one, or byte-level BPE trained on the training split."""

    path: Path | None = field(None, help="tokenizer.json (or its directory); default: train one")
    vocab_size: int = field(4096, help="vocabulary size when training one")
    pattern: Literal["gpt2", "cl100k", "llama3"] = field("gpt2", help="word-splitting regex when training one")
    eos_token: str = field("<|endoftext|>", help="the token written between documents")


@dataclass
class DataSection:
    """The corpus: text files, globs, directories, JSONL files, or "shakespeare" (the bundled corpus)."""

    sources: list[str] = field(default_factory=lambda: ["shakespeare"], help="list of files/globs/dirs, "
                               "e.g. '[data/*.txt, more.jsonl]'")
    text_field: str = field("text", help="the field holding the text in JSONL rows")
    held_out: float = field(0.05, help="fraction of documents held out for evaluation")
    block_size: int = field(256, help="tokens per training sequence")


@dataclass
class PretrainConfig:
    """Pretrain a decoder LM: train a tokenizer, tokenize to shards, train with checkpoints, export."""

    config: Path | None = field(None, help="YAML recipe (e.g. configs/pretrain/tiny.yaml); flags override its keys")
    out: Path | None = field(None, help="run directory (required)")
    seed: int = field(1337, help="seed of the model init, the data split and the data order")
    resume: bool = field(False, help="continue from the latest checkpoint in --out")
    objective: Literal["causal_lm", "masked_lm", "mlm_nsp", "span_corruption"] = field(
        "causal_lm", help="causal_lm (decoder presets), masked_lm or mlm_nsp (masked LM + next-sentence pairs; "
        "encoder presets), span_corruption (T5; encoder-decoder presets)")
    whole_word_masking: bool = field(False, help="masked LM: mask every piece of a chosen word")
    mask_probability: float = field(0.15, help="masked LM: share of tokens (or words) to predict")
    model: ModelSection = field(default_factory=ModelSection, help="model")
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection, help="tokenizer")
    data: DataSection = field(default_factory=DataSection, help="data")
    train: TrainConfig = field(default_factory=TrainConfig, help="training")
    parallel: ParallelConfig = field(default_factory=ParallelConfig, help="distributed training: a torchrun launch's "
                                     "layout (docs/parallel.md)")

    def __post_init__(self) -> None:
        check_seed(self.seed)
