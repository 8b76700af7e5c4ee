"""What `lmstack quickstart` takes: pretrain's config with the quickstart's defaults."""

from dataclasses import dataclass
from pathlib import Path

from lmstack.config import field
from lmstack.recipes.configs.pretrain import DataSection, ModelSection, PretrainConfig, TokenizerSection
from lmstack.train.config import TrainConfig


@dataclass
class QuickstartConfig(PretrainConfig):
    """Train a BPE tokenizer and a small GPT on Shakespeare (~10 min on 2 cores), report bits/byte, sample."""

    out: Path | None = field(Path("runs/quickstart"), help="run directory")
    model: ModelSection = field(default_factory=lambda: ModelSection(
        preset="tiny-llama", dim=192, n_layers=4, n_heads=6, n_kv_heads=6, ffn_dim=512, max_seq_len=256),
        help="model")
    tokenizer: TokenizerSection = field(default_factory=lambda: TokenizerSection(vocab_size=4096), help="tokenizer")
    data: DataSection = field(default_factory=lambda: DataSection(sources=["shakespeare"], held_out=0.1,
                                                                  block_size=256), help="data")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=1500, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=100, weight_decay=0.1, beta2=0.95,
        eval_every=250, eval_batches=10, checkpoint_every=500, keep_checkpoints=1), help="training")
    prompt: str = field("ROMEO.\n", help="the prompt the samples continue")
    new_tokens: int = field(60, help="tokens per sample")
