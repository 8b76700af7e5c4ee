"""`lmstack grpo` and `lmstack ppo`: reinforcement learning on a decoder's own samples, on the one
training loop.

    lmstack grpo --model.path smollm2-135m-instruct --data.train problems.jsonl \\
        --reward.functions exact_answer --group-size 8 --peft.method lora --out runs/grpo
    lmstack ppo --model.path runs/sft/model --reward.model runs/rm/model --data.train prompts.jsonl --out runs/ppo

Prompts are JSONL rows with a "prompt" (string or message list) plus the fields reward functions read
("answer" for exact_answer). Rewards are reward functions (built-in names or your module:function) or a
reward model (`lmstack reward`'s model/, sharing the policy's tokenizer). The run directory gets
metrics.jsonl (reward, KL, entropy, clip fraction, ... per step), loss.png and rl.png (those curves),
resumable checkpoints, model/ (the trained policy, adapters merged) and adapter/ for a PEFT run; PPO also
writes value/ (its value model). With ``data.eval`` held-out prompts are scored with greedy completions
during and after training, and a few are printed at the end.
"""

import copy
import functools
from pathlib import Path

import torch

from lmstack.align import (GRPOObjective, GRPORollouts, PolicyAndValue, PPOObjective, PPORollouts, Reference,
                           RewardEvaluation, RewardSource, load_reward_function)
from lmstack.checkpoints import load_model, save_hf
from lmstack.checkpoints.model_files import open_model
from lmstack.data.prompts import encode_prompts, read_prompt_rows
from lmstack.errors import ConfigError
from lmstack.generate import GenerationConfig
from lmstack.models.heads import with_score_head
from lmstack.nn.transforms import apply_transforms
from lmstack.parallel.config import ParallelConfig
from lmstack.recipes.align import _fit, _load, _pad_id
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.rl import GRPOConfig, PPOConfig
from lmstack.recipes.distributed import one_process_only
from lmstack.recipes.finetune_lm import peft_transforms
from lmstack.train.plots import plot_metric_panels
from lmstack.train.run_dir import prepare_run_dir
from lmstack.train.trainer import resolve_device

CURVES = ["reward", "score", "eval_reward", "kl", "entropy", "clip_fraction", "value_loss", "completion_length"]


def _score_model(path: Path, what: str):
    model = open_model(resolve_model_dir(path), load=load_model).model
    if not hasattr(model, "score"):
        raise ConfigError(f"{what} {path} has no score head (train one with `lmstack reward`)")
    return model


def _setup(cfg, model, files):
    """(training prompts, RewardSource, sampling config, held-out RewardEvaluation or None)."""
    if (cfg.reward.model is None) == (not cfg.reward.functions):
        raise ConfigError("give exactly one of reward.functions and reward.model")
    tokenizer, template = files.tokenizer, files.chat_template.text
    encode = lambda path: encode_prompts(read_prompt_rows(path), tokenizer, template,  # noqa: E731
                                         cfg.data.max_prompt_length)
    train = encode(cfg.data.train)
    print(f"train: {train.report()}")
    if cfg.reward.model is not None:
        reward_model = _score_model(cfg.reward.model, "reward.model")
        if reward_model.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"reward.model {cfg.reward.model} has a vocabulary of {reward_model.config.vocab_size}"
                              f", the policy {model.config.vocab_size}: it must share the policy's tokenizer")
        rewards = RewardSource(reward_model.to(resolve_device(cfg.train.device)))
    else:
        rewards = RewardSource(reward_fns=[load_reward_function(s) for s in cfg.reward.functions],
                               weights=cfg.reward.weights, tokenizer=tokenizer)
    pad = _pad_id(files)
    generation = GenerationConfig(max_new_tokens=cfg.sampling.max_new_tokens, do_sample=True,
                                  temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k,
                                  top_p=cfg.sampling.top_p, eos_token_id=list(files.stop_ids), pad_token_id=pad)
    generation.validate()
    evaluation = None
    if cfg.data.eval:
        held = encode(cfg.data.eval)
        print(f"held-out: {held.report()}")
        evaluation = RewardEvaluation(held.examples, rewards, generation, pad, batch_size=cfg.train.batch_size)
    return train.examples, rewards, generation, evaluation


def _reference(cfg, model) -> Reference:
    return Reference.for_policy(model, None if cfg.peft.method != "none" else copy.deepcopy(model))


def _samples(evaluation: RewardEvaluation | None, policy, shown: int = 3) -> None:
    if evaluation is None or evaluation.rewards.tokenizer is None:
        return
    indices = list(range(min(shown, len(evaluation.examples))))
    scores, texts = evaluation.completions(policy, indices)
    for i, score, text in zip(indices, scores.tolist(), texts):
        print(f"--- held-out prompt {i + 1} (reward {score:.3f})\n{evaluation.examples[i].text.strip()[-200:]}\n"
              f">>> {text.strip()[:300]}")


def _curves(out: Path, job: str) -> None:
    written = plot_metric_panels(out / "metrics.jsonl", out / "rl.png", CURVES, f"{job} ({out.name})")
    if written:
        print(f"wrote {written}")


def grpo(cfg: GRPOConfig) -> dict:
    """Group-relative policy optimisation; returns the final metrics record."""
    one_process_only(ParallelConfig(), "grpo")
    out = prepare_run_dir(cfg, "grpo.yaml")
    model, files, _ = _load(cfg)
    examples, rewards, generation, evaluation = _setup(cfg, model, files)
    reference = _reference(cfg, model) if cfg.beta > 0 else None
    rollouts = GRPORollouts(model, examples, rewards, group_size=cfg.group_size, prompts_per_step=cfg.train.batch_size,
                            generation=generation, seed=cfg.seed, pad_id=_pad_id(files), reference=reference,
                            beta=cfg.beta, scale_rewards=cfg.scale_rewards)
    objective = GRPOObjective(cfg.beta, cfg.epsilon_low, cfg.epsilon_high, cfg.loss_type,
                              cfg.sampling.max_new_tokens, evaluation, cfg.sampling.temperature)
    final = _fit(cfg, model, files, objective, rollouts, evaluation.batches if evaluation else None, out, "grpo")
    _curves(out, "grpo")
    _samples(evaluation, model)
    return final


def ppo(cfg: PPOConfig) -> dict:
    """PPO with a value model and a KL penalty to the starting model; returns the final metrics record."""
    one_process_only(ParallelConfig(), "ppo")
    out = prepare_run_dir(cfg, "ppo.yaml")
    policy, files, path = _load(cfg)
    examples, rewards, generation, evaluation = _setup(cfg, policy, files)
    start = cfg.value_model or cfg.reward.model
    torch.manual_seed(cfg.seed + 1)  # the value head's (and its adapters') starting values
    if start is not None:
        value = _score_model(start, "value_model")
        value = apply_transforms(value, peft_transforms(cfg.peft, ("score*",)))
    else:  # the starting policy's weights under a new one-output head
        base = open_model(path, load=functools.partial(load_model, transforms=[])).model
        value = apply_transforms(with_score_head(base, 1), peft_transforms(cfg.peft, ("score*",)))
    model = PolicyAndValue(policy, value)
    rollouts = PPORollouts(model, examples, rewards, reference=_reference(cfg, policy), generation=generation,
                           pad_id=_pad_id(files), seed=cfg.seed, rollout_size=cfg.rollout_prompts,
                           minibatch_size=cfg.train.batch_size, ppo_epochs=cfg.ppo_epochs, kl_coef=cfg.kl_coef,
                           gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
                           missing_eos_penalty=cfg.missing_eos_penalty)
    objective = PPOObjective(cfg.clip_range, cfg.clip_range_value, cfg.vf_coef, cfg.sampling.temperature, evaluation)
    final = _fit(cfg, model, files, objective, rollouts, evaluation.batches if evaluation else None, out, "ppo",
                 policy=policy)
    value.eval()
    print(f"wrote {save_hf(value, out / 'value', dequantize=cfg.peft.method == 'qlora')}")
    _curves(out, "ppo")
    _samples(evaluation, policy)
    return final
