"""PPO on the one training loop: it raises the reward it is given, and a run resumed mid-rollout (its
unfinished minibatches saved with the data position) continues exactly as one never interrupted."""

import copy
import json

import torch

from lmstack.align import PolicyAndValue, PPOObjective, PPORollouts, Reference, RewardSource
from lmstack.data.prompts import PromptExample
from lmstack.generate import GenerationConfig
from lmstack.models import build_model
from lmstack.models.heads import with_score_head
from lmstack.tokenizers import train_bpe
from lmstack.train import Trainer, TrainConfig
from tests.tokenizers.corpus import TRAIN


class LowTokenCount(torch.nn.Module):
    """A stand-in reward model with a learnable preference: a row's score at position t counts its tokens up
    to t with ids below 256 (half the vocabulary) less those above, so a uniform sampler scores about 0."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, so it has a device

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        low = ((input_ids < 256).float() - 0.5) * 2 * (attention_mask if attention_mask is not None else 1)
        return low.cumsum(1)[..., None] + self.anchor


def _setup(seed=0, prompt_free=False):
    tokenizer = train_bpe(TRAIN, 400, special_tokens=["<|endoftext|>"])
    torch.manual_seed(seed)
    policy = build_model("tiny-llama", seed=seed)
    value = with_score_head(build_model("tiny-llama", seed=seed + 1), 1)
    model = PolicyAndValue(policy, value)
    reward_model = LowTokenCount()

    examples = [PromptExample(tokenizer.encode(t[:24], add_special_tokens=False), t[:24], {}) for t in TRAIN[:8]]
    examples = [PromptExample([7, 8, 9], "", {})] * 8 if prompt_free else examples
    rollouts = PPORollouts(model, examples, RewardSource(reward_model),
                           reference=Reference(copy.deepcopy(policy)), pad_id=0, seed=seed, rollout_size=8,
                           minibatch_size=4, ppo_epochs=2, kl_coef=0.02,
                           generation=GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0,
                                                       eos_token_id=[]))
    return model, rollouts, PPOObjective(vf_coef=0.1, temperature=1.0)


def test_ppo_raises_the_reward_it_is_given():
    model, rollouts, objective = _setup(prompt_free=True)  # one prompt: the score varies with the completion only
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scores, logged = [], []
    for _ in range(48):  # 12 rollouts x (2 epochs x 2 minibatches)
        loss, metrics = objective(model, rollouts.next_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scores.append(metrics["score"])  # the rollout's mean score, logged with each of its 4 minibatches
        logged.append(metrics)
    first, last = sum(scores[:12]) / 12, sum(scores[-12:]) / 12  # the first and last 3 rollouts
    assert last > first + 2.0, (first, last)  # of at most +8 (every completion token below 256)
    assert {"kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "approx_kl"} <= set(logged[-1])
    assert any(m["clip_fraction"] > 0 for m in logged)  # later epochs moved beyond the clip range
    assert rollouts.rollouts == 12


def _train(tmp_path, steps, resume=False):
    model, rollouts, objective = _setup()
    config = TrainConfig(max_steps=steps, batch_size=2, lr=1e-3, min_lr=1e-3, warmup_steps=0, eval_every=0,
                         checkpoint_every=3, progress=False)
    Trainer(model, objective, rollouts, config, tmp_path).fit(resume=resume)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_ppo_resumes_mid_rollout_exactly(tmp_path):
    whole = _train(tmp_path / "whole", 6)
    _train(tmp_path / "cut", 3)  # step 3 is mid-way through the first rollout's 4 minibatches
    resumed = _train(tmp_path / "cut", 6, resume=True)
    assert (tmp_path / "cut" / "checkpoints" / "step-0000003" / "trainable.safetensors").is_file()
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    assert [r["kl"] for r in resumed] == [r["kl"] for r in whole]


def test_generation_logprobs_equal_a_full_forward_at_the_temperature():
    """The behaviour log-probs PPO takes from generation are what a training forward scores."""
    from lmstack.align import token_logps
    from lmstack.align.rollouts import sample_completions

    model = build_model("tiny-llama", seed=3).eval()
    config = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=0, eos_token_id=[2],
                              pad_token_id=0)
    rollout = sample_completions(model, [[5, 6, 7, 8], [9, 10]], 0, config, num_return_sequences=2, seed=4)
    width = rollout["input_ids"].shape[1] - rollout["completions"].shape[1]
    with torch.no_grad():
        full = token_logps(model, rollout["input_ids"], rollout["attention_mask"], rollout["completion_mask"],
                           rollout["position_ids"], temperature=0.7)[:, width - 1:]
    assert torch.allclose(full, rollout["sample_logps"], atol=1e-5)
    assert rollout["completion_mask"].sum() > 8  # real completions were scored


def test_inverse_cdf_sampling_draws_the_distribution():
    from lmstack.generate.search import sample_from

    probs = torch.tensor([[0.0, 0.5, 0.2, 0.0, 0.3]]).repeat(40_000, 1)
    draws = sample_from(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).float() / len(draws)
    assert counts[0] == 0 and counts[3] == 0  # zero-probability tokens are never drawn
    assert torch.allclose(counts, probs[0], atol=0.01)
