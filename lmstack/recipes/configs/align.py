"""What `lmstack sft`, `lmstack dpo` and `lmstack reward` take (the schemas of their YAML recipes)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import check_seed, field
from lmstack.peft.config import PeftSection
from lmstack.parallel.config import ParallelConfig
from lmstack.train.config import TrainConfig


@dataclass
class AlignModelSection:
    """The decoder to align: an HF-format directory or a GGUF file (with its tokenizer and chat template)."""

    path: Path | None = field(None, help="checkpoint directory or .gguf, or smollm2-135m-instruct (bundled)")
    activation_checkpointing: bool = field(False, help="recompute each block's activations in backward (memory)")


@dataclass
class AlignDataSection:
    """JSONL files: SFT rows hold "messages" (or "prompt" + "completion"); preference rows "prompt", "chosen",
    "rejected" (optional "margin"); KTO rows "prompt", "completion", "label" (true = desirable)."""

    train: Path | None = field(None, help="training JSONL (required)")
    eval: Path | None = field(None, help="held-out JSONL scored during and after training")
    max_length: int = field(512, help="longest example in tokens; longer rows are skipped and counted")
    packing: bool = field(False, help="SFT: pack several conversations into each row (attention kept inside each)")


@dataclass
class _AlignJob:
    config: Path | None = field(None, help="YAML recipe (its keys are these flags; the flags given override it)")
    out: Path | None = field(None, help="run directory (required)")
    seed: int = field(1337, help="seed of new weights (adapters, heads) and of the data order")
    resume: bool = field(False, help="continue from the latest checkpoint in --out")
    model: AlignModelSection = field(default_factory=AlignModelSection, help="model")
    data: AlignDataSection = field(default_factory=AlignDataSection, help="data")
    peft: PeftSection = field(default_factory=PeftSection, help="parameter-efficient fine-tuning")
    train: TrainConfig = field(default_factory=TrainConfig, help="training")
    parallel: ParallelConfig = field(default_factory=ParallelConfig, help="distributed training: a torchrun launch's "
                                     "layout (docs/parallel.md)")

    def __post_init__(self) -> None:
        check_seed(self.seed)


@dataclass
class SFTConfig(_AlignJob):
    """Supervised fine-tuning on chat data: the loss on assistant tokens only, optionally packed."""


@dataclass
class DPOConfig(_AlignJob):
    """Preference optimisation: DPO (sigmoid), hinge, IPO, robust DPO, SimPO, ORPO, or KTO on unpaired rows."""

    loss: Literal["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto"] = field(
        "sigmoid", help="the preference loss (kto reads prompt/completion/label rows)")
    beta: float = field(0.1, help="KL strength (DPO family, KTO), reward scale (SimPO), odds-ratio weight (ORPO)")
    label_smoothing: float = field(0.0, help="assumed rate of flipped preferences (sigmoid, robust, simpo)")
    simpo_gamma: float = field(0.5, help="SimPO's target reward margin")
    reference: Path | None = field(None, help="reference model (default: the starting model itself; with a PEFT "
                                              "method, the policy with its adapters off)")


@dataclass
class RewardConfig(_AlignJob):
    """A reward model: the decoder with a scalar score head, trained with the Bradley-Terry pairwise loss."""

    center_coefficient: float = field(0.0, help="weight of the term keeping rewards centred at zero")

