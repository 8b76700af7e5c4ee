"""Alignment pieces by their defining properties: packed SFT equals unpacked, score models save as
transformers' sequence-classification class, bad data is named, GRPO rollouts and rewards."""

import math

import pytest
import torch

from lmstack.align import GRPOObjective, GRPORollouts, PreferenceObjective, Reference, RewardObjective, gae
from lmstack.align.rollouts import RewardSource, completion_mask_until_eos, score_completions
from lmstack.checkpoints import load_hf, save_hf
from lmstack.data.preference import collate_pairs, encode_pairs
from lmstack.data.prompts import PromptExample
from lmstack.data.sft import collate_sft, encode_sft, pack
from lmstack.errors import ConfigError, DataError
from lmstack.generate import GenerationConfig
from lmstack.models import build_model
from lmstack.models.heads import last_token_scores, with_score_head
from lmstack.tokenizers import CHATML_TEMPLATE, train_bpe
from lmstack.train import CausalLMObjective
from tests.tokenizers.corpus import TRAIN

CHAT = [{"role": "user", "content": "What is the weather like?"}, {"role": "assistant", "content": "Sunny and warm."}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TRAIN, 400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def _model(seed=0):
    return build_model("tiny-llama", seed=seed)


def test_packed_rows_compute_what_padded_rows_compute(tokenizer):
    """Loss and gradients of packed rows (segment ids, restarting positions) equal one example per row."""
    rows = [{"messages": [{"role": "user", "content": TRAIN[i][:40]},
                          {"role": "assistant", "content": TRAIN[i + 1][:30]}]} for i in range(5)]
    examples = encode_sft(rows, tokenizer, CHATML_TEMPLATE, eos_id=0, max_length=256).examples
    packed_rows = pack([len(e.ids) for e in examples], 256)
    assert len(packed_rows) < len(examples)  # several examples share a row
    losses, grads = [], []
    for layout in (packed_rows, [[i] for i in range(len(examples))]):
        model = _model()
        batch = collate_sft(examples, layout, pad_id=0)
        loss, metrics = CausalLMObjective()(model, batch)
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_segment_ids_stop_attention_across_examples():
    model = _model().eval()
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 5))
    packed = model(torch.cat([a, b], 1), torch.tensor([[1] * 7 + [2] * 5]),
                   torch.cat([torch.arange(7), torch.arange(5)])[None])
    assert torch.allclose(packed[:, 7:], model(b), atol=1e-5)
    assert torch.allclose(packed[:, :7], model(a), atol=1e-5)


def test_sft_mask_covers_assistant_text_only(tokenizer):
    example = encode_sft([{"messages": CHAT}], tokenizer, CHATML_TEMPLATE, eos_id=0, max_length=256).examples[0]
    trained = tokenizer.decode([i for i, m in zip(example.ids, example.mask) if m])
    assert trained.startswith("Sunny and warm.") and "weather" not in trained


def test_sft_bad_rows_are_named(tokenizer):
    with pytest.raises(DataError, match="row 1: the conversation has no assistant turn"):
        encode_sft([{"messages": CHAT[:1]}], tokenizer, CHATML_TEMPLATE, eos_id=0, max_length=256)
    drops_content = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # renders no assistant text
    with pytest.raises(DataError, match="no loss mask is possible"):
        encode_sft([{"messages": CHAT}], tokenizer, drops_content, eos_id=0, max_length=256)
    encoded = encode_sft([{"messages": CHAT}, {"prompt": "x" * 300, "completion": "y"}], tokenizer, CHATML_TEMPLATE,
                         eos_id=0, max_length=64)
    assert encoded.skipped == {"longer than max_length": 1} and "1 longer than max_length" in encoded.report()


def test_identical_pairs_are_skipped_and_counted(tokenizer):
    rows = [{"prompt": "a", "chosen": " same", "rejected": " same"}, {"prompt": "a", "chosen": " b", "rejected": " c"}]
    encoded = encode_pairs(rows, tokenizer, None, eos_id=0, max_length=64)
    assert len(encoded.examples) == 1 and encoded.skipped["chosen == rejected"] == 1
    with pytest.raises(DataError, match="1 chosen == rejected"):
        encode_pairs(rows[:1], tokenizer, None, eos_id=0, max_length=64)


def test_score_model_saves_as_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = with_score_head(_model(), 1)
    model.config.pad_token_id = 0
    save_hf(model, tmp_path)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(1, 256, (3, 9))
    mask = torch.ones_like(ids)
    ids[0, 6:], mask[0, 6:] = 0, 0  # padded row: pooled at its last real token
    ours = last_token_scores(load_hf(tmp_path).eval()(ids, mask), mask)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_reward_objective_learns_a_preference(tokenizer):
    torch.manual_seed(0)
    model = with_score_head(_model(), 1)
    rows = [{"prompt": f"q{i}", "chosen": " good answer", "rejected": " bad"} for i in range(4)]
    pairs = encode_pairs(rows, tokenizer, None, eos_id=0, max_length=64).examples
    batch = collate_pairs(pairs, [0, 1, 2, 3], pad_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = RewardObjective()
    first = float(objective(model, batch)[0])
    for _ in range(20):
        optimizer.zero_grad()
        objective(model, batch)[0].backward()
        optimizer.step()
    loss, metrics = objective(model, batch)
    assert float(loss) < first and metrics["reward_accuracy"] == 1.0


def test_dpo_with_policy_equal_to_reference_is_log_two(tokenizer):
    rows = [{"prompt": "q", "chosen": " yes", "rejected": " no way"}]
    batch = collate_pairs(encode_pairs(rows, tokenizer, None, eos_id=0, max_length=64).examples, [0], pad_id=0)
    objective = PreferenceObjective("sigmoid", beta=0.1, reference=Reference(_model()))
    loss, metrics = objective(_model(), batch)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6) and metrics["reward_margin"] == 0.0


def test_preference_objective_refuses_bad_settings():
    with pytest.raises(ConfigError, match="needs a reference"):
        PreferenceObjective("sigmoid")
    with pytest.raises(ConfigError, match="unknown preference loss"):
        PreferenceObjective("kto", reference=Reference(_model()))


def test_reward_functions_that_fail_are_named():
    def broken(completions, **_):
        raise RuntimeError("boom")

    with pytest.raises(ConfigError, match="reward function 'broken' raised RuntimeError: boom"):
        score_completions([broken], [1.0], ["p"], ["c"], {})
    nan = score_completions([lambda completions, **_: [float("nan"), 1.0]], [1.0], ["p", "p"], ["a", "b"], {})
    assert math.isnan(nan[0]) and nan[1] == 1.0


def test_completion_mask_stops_after_first_eos():
    mask = completion_mask_until_eos(torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9]]), [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_grpo_rollouts_raise_the_reward_they_are_given(tokenizer):
    """Rewarding one token: a few GRPO steps on the tiny model make it more likely (reward rises)."""
    torch.manual_seed(0)
    model = _model()
    target = tokenizer.encode(" the", add_special_tokens=False)[0]
    prompts = [tokenizer.encode(t[:20], add_special_tokens=False) for t in TRAIN[:4]]

    def count_target(completions, **_):
        return [float(sum(tok == target for tok in tokenizer.encode(c, add_special_tokens=False))) for c in completions]

    examples = [PromptExample(ids, t[:20], {}) for ids, t in zip(prompts, TRAIN[:4])]
    rollouts = GRPORollouts(model, examples, RewardSource(reward_fns=[count_target], tokenizer=tokenizer),
                            group_size=4, prompts_per_step=2, seed=0, pad_id=0,
                            generation=GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=0, eos_token_id=[]))
    objective = GRPOObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rewards = []
    for _ in range(12):
        batch = rollouts.next_batch()
        loss, metrics = objective(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(metrics["reward"])
    assert sum(rewards[-4:]) > sum(rewards[:4])
    state = rollouts.state_dict()
    assert state["rollouts"] == 12


def test_gae_matches_the_recursion():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 0.2, 0.1]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    d2 = 2.0 - 0.1
    d1 = 0.0 + 0.9 * 0.1 - 0.2
    d0 = 1.0 + 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.72 * d2
    assert advantages.tolist()[0] == pytest.approx([d0 + 0.72 * a1, a1, a2])
    assert torch.allclose(returns, advantages + values)
