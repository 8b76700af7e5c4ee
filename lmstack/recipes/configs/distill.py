"""What `lmstack distill` takes (the schema of configs/distill/*.yaml)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import check_seed, field
from lmstack.train.config import TrainConfig


@dataclass
class DistillStudentSection:
    """The student: a checkpoint of its own (same tokenizer as the teacher), or cut from the teacher."""

    path: Path | None = field(None, help="student checkpoint directory or .gguf (it must share the teacher's "
                                         "tokenizer)")
    layers: int | None = field(None, help="cut the student from the teacher: this many of its blocks (half depth: "
                                          "n_layers / 2), chosen by --student.pick")
    init: Literal["teacher", "random"] = field("teacher", help="with --student.layers: start from the teacher's "
                                                               "blocks, or fresh weights of that shape")
    pick: Literal["spread", "influence"] = field(
        "spread", help="with --student.layers: which of the teacher's blocks it keeps: evenly spaced (DistilBERT), or "
                       "the most influential on the training text (ShortGPT's block influence, 1 - cos(in, out))")


@dataclass
class DistillDataSection:
    """Text to distil on: .txt / .md files or JSONL, packed into blocks as fine-tuning does."""

    train: Path | None = field(None, help="training text (.txt, .md or .jsonl; required)")
    eval: Path | None = field(None, help="held-out text scored during and after training")
    text_field: str = field("text", help="JSONL: the text field")
    max_length: int = field(128, help="tokens per packed block")


@dataclass
class DistillSection:
    """The distillation loss (docs/compression.md)."""

    loss: Literal["kd", "jsd"] = field("kd", help="kd: temperature-scaled KL with the T^2 factor; jsd: GKD's "
                                                  "generalised Jensen-Shannon divergence")
    temperature: float = field(2.0, help="softmax temperature of both distributions")
    alpha: float = field(0.5, help="weight of the distillation term; 1 - alpha goes to the real next tokens")
    beta: float = field(0.5, help="jsd: 0 is KL(teacher||student), 1 is KL(student||teacher)")
    hidden_weight: float = field(0.0, help="weight of the hidden-state MSE (through learned projections)")
    attention_weight: float = field(0.0, help="weight of the attention-map KL (head-averaged maps)")
    mode: Literal["text", "on_policy", "sequence"] = field(
        "text", help="text: the training data; on_policy: the student samples the continuation, the teacher "
                     "scores it (GKD); sequence: the teacher writes the continuation")
    on_policy_fraction: float = field(0.5, help="on_policy: fraction of batches the student writes (GKD's lambda)")
    prompt_tokens: int = field(16, help="on_policy / sequence: tokens of each block kept as the prompt")
    sample_temperature: float = field(1.0, help="on_policy / sequence: sampling temperature")


@dataclass
class DistillConfig:
    """Distil a teacher decoder into a student (shallower, narrower, or a checkpoint of its own) on text, and
    export the student in Hugging Face format."""

    config: Path | None = field(None, help="YAML recipe (its keys are these flags; the flags given override it)")
    out: Path | None = field(None, help="run directory (required)")
    teacher: Path | None = field(None, help="teacher checkpoint directory, .gguf, or a bundled name (required)")
    seed: int = field(1337, help="seed of the data order, a fresh student and the sampling")
    resume: bool = field(False, help="continue from the latest checkpoint in --out")
    student: DistillStudentSection = field(default_factory=DistillStudentSection, help="student")
    data: DistillDataSection = field(default_factory=DistillDataSection, help="data")
    distill: DistillSection = field(default_factory=DistillSection, help="loss")
    train: TrainConfig = field(default_factory=TrainConfig, help="training")

    def __post_init__(self) -> None:
        check_seed(self.seed)
        from lmstack.errors import ConfigError

        if (self.student.path is None) == (self.student.layers is None):
            raise ConfigError("give exactly one of --student.path (a checkpoint) and --student.layers (cut from "
                              "the teacher)")
        if self.student.layers is not None and self.student.layers < 1:
            raise ConfigError(f"--student.layers={self.student.layers} must be at least 1")
