"""What `lmstack grpo` and `lmstack ppo` take (the schemas of their YAML recipes)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import check_seed, field
from lmstack.peft.config import PeftSection
from lmstack.recipes.configs.align import AlignModelSection
from lmstack.train.config import TrainConfig


@dataclass
class PromptDataSection:
    """JSONL rows with a "prompt" (a string used as it is, or a message list rendered with the chat template
    and its assistant header) and whatever fields the reward functions read (e.g. "answer")."""

    train: Path | None = field(None, help="training prompts JSONL (required)")
    eval: Path | None = field(None, help="held-out prompts, scored by the reward with greedy completions")
    max_prompt_length: int = field(256, help="longest prompt in tokens; longer ones are skipped and counted")


@dataclass
class SamplingSection:
    """How rollouts are sampled (lmstack.generate with a KV cache)."""

    max_new_tokens: int = field(64, help="longest completion in tokens")
    temperature: float = field(1.0, help="sampling temperature (log-probs are scored at the same temperature)")
    top_k: int = field(0, help="sample among the k likeliest tokens (0: all; RL ratios assume the full softmax)")
    top_p: float = field(1.0, help="nucleus mass (1.0: off)")


@dataclass
class RewardSection:
    """Where rewards come from: reward functions on the completion text, or a reward model."""

    functions: list[str] | None = field(None, help="built-in names (exact_answer, answer_line, short) or "
                                                   "module:function / file.py:function")
    weights: list[float] | None = field(None, help="one weight per reward function (default all 1)")
    model: Path | None = field(None, help="a reward model directory (`lmstack reward`'s model/) instead")


@dataclass
class _RLJob:
    config: Path | None = field(None, help="YAML recipe (its keys are these flags; the flags given override it)")
    out: Path | None = field(None, help="run directory (required)")
    seed: int = field(1337, help="seed of new weights, of the prompt order and of sampling")
    resume: bool = field(False, help="continue from the latest checkpoint in --out")
    model: AlignModelSection = field(default_factory=AlignModelSection, help="the policy's starting model")
    data: PromptDataSection = field(default_factory=PromptDataSection, help="prompts")
    sampling: SamplingSection = field(default_factory=SamplingSection, help="rollout sampling")
    reward: RewardSection = field(default_factory=RewardSection, help="reward")
    peft: PeftSection = field(default_factory=PeftSection, help="parameter-efficient fine-tuning")
    train: TrainConfig = field(default_factory=TrainConfig, help="training")

    def __post_init__(self) -> None:
        check_seed(self.seed)


@dataclass
class GRPOConfig(_RLJob):
    """GRPO: train.batch_size prompts per step, group_size sampled completions each, advantages relative to
    the group, no value model."""

    group_size: int = field(8, help="completions sampled per prompt (>= 2)")
    beta: float = field(0.0, help="KL penalty to the starting model (0: no reference pass)")
    epsilon_low: float = field(0.2, help="lower clip of the ratio")
    epsilon_high: float = field(0.2, help="upper clip of the ratio (DAPO raises it, e.g. 0.28)")
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = field("dapo", help="how token losses are averaged")
    scale_rewards: bool = field(True, help="divide advantages by the group's reward std")


@dataclass
class PPOConfig(_RLJob):
    """PPO (RLHF): rollouts of rollout_prompts prompts, then ppo_epochs passes in minibatches of
    train.batch_size, a value model, GAE and a per-token KL penalty to the starting model."""

    rollout_prompts: int = field(16, help="prompts sampled per rollout")
    ppo_epochs: int = field(4, help="passes over each rollout")
    kl_coef: float = field(0.05, help="per-token KL penalty to the reference")
    vf_coef: float = field(0.1, help="weight of the value loss")
    clip_range: float = field(0.2, help="policy ratio clip")
    clip_range_value: float = field(0.2, help="value prediction clip")
    gamma: float = field(1.0, help="discount")
    lam: float = field(0.95, help="GAE lambda")
    whiten_rewards: bool = field(False, help="whiten per-token rewards before GAE")
    missing_eos_penalty: float | None = field(None, help="subtracted from the score of completions that never stop")
    value_model: Path | None = field(None, help="value model start (default: the reward model if given, else "
                                                "the policy with a new score head)")
