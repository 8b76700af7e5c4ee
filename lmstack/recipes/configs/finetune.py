"""What `lmstack finetune` takes (the schema of configs/finetune/*.yaml)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import check_seed, field
from lmstack.peft.config import PeftSection
from lmstack.parallel.config import ParallelConfig
from lmstack.train.config import TrainConfig


@dataclass
class FinetuneModelSection:
    """The checkpoint to fine-tune: an HF-format BERT directory with its vocab (classification tasks), or a
    decoder directory / GGUF file (causal_lm)."""

    path: Path | None = field(None, help="checkpoint directory or .gguf, or all-minilm-l6-v2 / smollm2-135m-instruct "
                                         "(the bundled packages)")
    reset_head: bool = field(False, help="replace a task head that does not match this task's labels")
    activation_checkpointing: bool = field(False, help="memory-saving mode: recompute each block's activations in "
                                                       "backward and unmap freed large blocks (QLoRA's recipe; "
                                                       "slower steps)")


@dataclass
class FinetuneDataSection:
    """Labelled files and their column names."""

    train: Path | None = field(None, help="training file (.csv or .jsonl; causal_lm: .txt, .md or .jsonl)")
    eval: Path | None = field(None, help="held-out file scored during and after training")
    text_field: str = field("text", help="sequence tasks: the text column")
    text_pair_field: str | None = field(None, help="sequence-pair tasks: the second text column")
    label_field: str = field("label", help="sequence tasks: the label column")
    tokens_field: str = field("tokens", help="token tasks: the JSONL field holding the list of words")
    tags_field: str = field("tags", help="token tasks: the JSONL field holding the list of BIO tags")
    labels: list[str] | None = field(None, help="the label set, in id order (default: sorted from the training file)")
    max_length: int = field(128, help="longest tokenized row (causal_lm: the length of each packed block)")
    truncate: bool = field(False, help="cut rows longer than max_length (reported) instead of failing")


@dataclass
class FinetunePruneSection:
    """Gradual magnitude pruning while fine-tuning a decoder (causal_lm): the sparsity rises on Zhu & Gupta's cubic
    schedule from start_step to end_step, masks recomputed every ``every`` steps (docs/compression.md). A checkpoint
    pruned by `lmstack prune` keeps its zeros without this section."""

    sparsity: float = field(0.0, help="final fraction of each linear's weights to zero (0: no gradual pruning)")
    start_step: int = field(0, help="first pruning step")
    end_step: int | None = field(None, help="step that reaches the final sparsity (default: 3/4 of train.max_steps)")
    every: int = field(10, help="steps between mask updates")
    scope: Literal["layer", "global"] = field("layer", help="each matrix its fraction, or one threshold over all")

    def __post_init__(self) -> None:
        from lmstack.compress.settings import check_sparsity

        check_sparsity(self.sparsity, "prune.sparsity")


@dataclass
class FinetuneConfig:
    """Fine-tune an encoder for sequence (pair) classification or token classification (NER), or a decoder
    on text (causal_lm), in full or with a PEFT method."""

    config: Path | None = field(None, help="YAML recipe (e.g. configs/finetune/sentiment-minilm.yaml)")
    out: Path | None = field(None, help="run directory (required)")
    task: Literal["sequence_classification", "token_classification", "causal_lm"] = field(
        "sequence_classification", help="what to predict: one label per text (pair), one per word, or the next "
                                        "token of text (a decoder)")
    seed: int = field(1337, help="seed of the new head and of the data order")
    resume: bool = field(False, help="continue from the latest checkpoint in --out")
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection, help="model")
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection, help="data")
    peft: PeftSection = field(default_factory=PeftSection, help="parameter-efficient fine-tuning")
    prune: FinetunePruneSection = field(default_factory=FinetunePruneSection, help="gradual pruning (causal_lm)")
    train: TrainConfig = field(default_factory=TrainConfig, help="training")
    parallel: ParallelConfig = field(default_factory=ParallelConfig, help="distributed training: a torchrun launch's "
                                     "layout (docs/parallel.md)")

    def __post_init__(self) -> None:
        check_seed(self.seed)
