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
    train: TrainConfig = field(default_factory=TrainConfig, help="training")
    parallel: ParallelConfig = field(default_factory=ParallelConfig, help="distributed training: a torchrun launch's "
                                     "layout (docs/parallel.md)")

    def __post_init__(self) -> None:
        check_seed(self.seed)
