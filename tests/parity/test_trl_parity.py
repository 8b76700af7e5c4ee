"""Alignment losses equal to trl 1.16's on the same weights and batches (REFERENCES.md, section 2).

One tiny Llama (vocab 320) and one locally trained byte-level BPE serve every trainer; trl builds its batch
with its own collator, trl's loss comes from ``trainer.compute_loss`` and its logged metrics, and lmstack's
objective runs on the same tensors with the same weights loaded through ``lmstack.models.load_hf``. Where
the batch is built by lmstack too (SFT, DPO pairs), the token ids are compared as well.
"""

import copy

import pytest
import torch

from lmstack.align import (GRPOObjective, KTOObjective, PreferenceObjective, Reference, RewardObjective,
                           group_advantages, grpo_loss, token_logps)
from lmstack.data.preference import collate_pairs, encode_pairs
from lmstack.data.sft import collate_sft, encode_sft
from lmstack.checkpoints import load_hf
from lmstack.tokenizers import load_tokenizer, train_bpe
from lmstack.train import CausalLMObjective
from tests.parity.hf_reference import make_hf_model

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<bos>assistant: {% generation %}"
            "{{ m['content'] }}<eos>{% endgeneration %}{% else %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<bos>assistant: {% endif %}")
TEXTS = ["what is two plus two", "the cat sat on the mat", "four", "hello there, how are you", "one two three",
         "the dog ran in the park", "a quick brown fox", "good answer", "bad answer", "yes", "no"] * 20
PAIRS = {"prompt": ["what is two plus two?", "say hello", "name a colour", "count to three"],
         "chosen": [" four", " hello there", " blue", " one two three"],
         "rejected": [" five apples", " go away", " the cat", " three"]}
COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", bf16=False, per_device_train_batch_size=4,
              max_length=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(directory with tokenizer.json, HF tokenizer, HF policy dir, HF reference dir)."""
    root = tmp_path_factory.mktemp("trl")
    train_bpe(TEXTS, 300, special_tokens=["<pad>", "<eos>", "<bos>"]).save(root)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="<pad>",
                                               eos_token="<eos>", bos_token="<bos>")
    tok.chat_template = TEMPLATE
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    ref = make_hf_model(config, seed=0)
    ref.save_pretrained(root / "ref")
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # policy != reference, so margins are not zero
    policy.save_pretrained(root / "policy")
    return root, tok


def _hf(root, name, cls=None):
    return (cls or transformers.AutoModelForCausalLM).from_pretrained(root / name, dtype=torch.float32)


def _ours(root, name):
    return load_hf(root / name).eval()


def _trl_loss(trainer, batch):
    trainer.model.train()
    return float(trainer.compute_loss(trainer.model, batch))


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_dpo_losses_and_rewards_equal_trl(setup, tmp_path, loss_type, smoothing):
    root, tok = setup
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.1, loss_type=loss_type, label_smoothing=smoothing, **COMMON)
    trainer = trl.DPOTrainer(model=_hf(root, "policy"), ref_model=_hf(root, "ref"), args=args,
                             train_dataset=datasets.Dataset.from_dict(PAIRS), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    expected = _trl_loss(trainer, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    objective = PreferenceObjective(loss_type, beta=0.1, label_smoothing=smoothing,
                                    reference=Reference(_ours(root, "ref")))
    ours = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    loss, metrics = objective(_ours(root, "policy"), ours)
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    for theirs, mine in [("rewards/chosen", "reward_chosen"), ("rewards/rejected", "reward_rejected"),
                         ("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy"),
                         ("logps/chosen", "logps_chosen"), ("logps/rejected", "logps_rejected")]:
        assert metrics[mine] == pytest.approx(logged[theirs], abs=1e-5), theirs


def test_dpo_pair_batches_equal_trl(setup, tmp_path):
    """lmstack's tokenisation and collation of the same pairs give trl's rows (matched by content)."""
    root, tok = setup
    args = trl.DPOConfig(output_dir=str(tmp_path), **COMMON)
    trainer = trl.DPOTrainer(model=_hf(root, "policy"), ref_model=_hf(root, "ref"), args=args,
                             train_dataset=datasets.Dataset.from_dict(PAIRS), processing_class=tok)
    theirs = next(iter(trainer.get_train_dataloader()))
    rows = [dict(zip(PAIRS, values)) for values in zip(*PAIRS.values())]
    pairs = encode_pairs(rows, load_tokenizer(root), None, eos_id=1, max_length=64).examples
    mine = collate_pairs(pairs, list(range(len(pairs))), pad_id=0)

    def rows_of(batch):
        return sorted((tuple(i[m.bool()].tolist()), tuple(i[c.bool()].tolist()))
                      for i, m, c in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]))
    assert rows_of(mine) == rows_of(theirs)


def test_sft_assistant_only_loss_equals_trl(setup, tmp_path):
    root, tok = setup
    messages = [[{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}],
                [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the cat sat on the mat"},
                 {"role": "user", "content": "yes"}, {"role": "assistant", "content": "no"}]]
    args = trl.SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, **COMMON)
    trainer = trl.SFTTrainer(model=_hf(root, "policy"), args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict({"messages": messages}))
    theirs = next(iter(trainer.get_train_dataloader()))
    expected = _trl_loss(trainer, theirs)
    encoded = encode_sft([{"messages": m} for m in messages], load_tokenizer(root), TEMPLATE, eos_id=1, max_length=64)
    mine = collate_sft(encoded.examples, [[0], [1]], pad_id=0)
    kept = lambda labels: sorted(tuple(row[row != -100].tolist()) for row in labels)  # noqa: E731
    assert kept(theirs["labels"]) == kept(mine["labels"])  # trl's labels are unshifted, ours next-token targets
    loss, _ = CausalLMObjective()(_ours(root, "policy").train(), mine)
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_reward_loss_equals_trl(setup, tmp_path):
    root, tok = setup
    seqcls = transformers.LlamaForSequenceClassification.from_pretrained(root / "policy", num_labels=1,
                                                                         dtype=torch.float32)
    seqcls.save_pretrained(root / "reward")
    args = trl.RewardConfig(output_dir=str(tmp_path), **COMMON)
    trainer = trl.RewardTrainer(model=_hf(root, "reward", transformers.LlamaForSequenceClassification), args=args,
                                train_dataset=datasets.Dataset.from_dict(PAIRS), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    expected = _trl_loss(trainer, batch)
    model = _ours(root, "reward")
    assert model.config.num_scores == 1
    loss, metrics = RewardObjective()(model, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(trainer._metrics["train"]["accuracy"][-1], abs=1e-6)


def test_kto_loss_equals_trl(setup, tmp_path):
    root, tok = setup
    data = {"prompt": PAIRS["prompt"], "completion": PAIRS["chosen"][:2] + PAIRS["rejected"][2:],
            "label": [True, True, False, False]}
    args = trl.KTOConfig(output_dir=str(tmp_path), beta=0.1, **COMMON)
    trainer = trl.KTOTrainer(model=_hf(root, "policy"), ref_model=_hf(root, "ref"), args=args,
                             train_dataset=datasets.Dataset.from_dict(data), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    expected = _trl_loss(trainer, batch)
    objective = KTOObjective(beta=0.1, reference=Reference(_ours(root, "ref")))
    loss, metrics = objective(_ours(root, "policy"), {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert metrics["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-5)


def _concatenated(batch):
    """trl's chosen_/rejected_ batch (labels −100 on the prompt) as lmstack's (2B, T) pair batch."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    ids = torch.cat([pad(batch["chosen_input_ids"], 0), pad(batch["rejected_input_ids"], 0)])
    attention = torch.cat([pad(batch["chosen_attention_mask"], 0), pad(batch["rejected_attention_mask"], 0)])
    labels = torch.cat([pad(batch["chosen_labels"], -100), pad(batch["rejected_labels"], -100)])
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": (labels != -100).long()}


def test_simpo_loss_equals_trl_cpo(setup, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    root, tok = setup
    args = CPOConfig(output_dir=str(tmp_path), loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, **COMMON)
    trainer = CPOTrainer(model=_hf(root, "policy"), args=args, train_dataset=datasets.Dataset.from_dict(PAIRS),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    expected = _trl_loss(trainer, batch)
    loss, _ = PreferenceObjective("simpo", beta=2.0, simpo_gamma=0.5)(_ours(root, "policy"), _concatenated(batch))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_orpo_loss_equals_trl(setup, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    root, tok = setup
    args = ORPOConfig(output_dir=str(tmp_path), beta=0.1, **COMMON)
    trainer = ORPOTrainer(model=_hf(root, "policy"), args=args, train_dataset=datasets.Dataset.from_dict(PAIRS),
                          processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    expected = _trl_loss(trainer, batch)
    loss, _ = PreferenceObjective("orpo", beta=0.1)(_ours(root, "policy"), _concatenated(batch))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_advantages_and_loss_equal_trl(setup, tmp_path, temperature):
    """trl scores the policy and the reference at the sampling temperature; so does GRPOObjective."""
    root, tok = setup
    tok.save_pretrained(root / "policy")

    def length_reward(completions, **_):
        return [float(len(c)) for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, loss_type="grpo", beta=0.04, use_cpu=True, report_to=[],
                          save_strategy="no", bf16=False, temperature=temperature)
    trainer = trl.GRPOTrainer(model=str(root / "policy"), reward_funcs=length_reward, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": PAIRS["prompt"]}),
                              processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    completion = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], 1)
    texts = tok.batch_decode(inputs["completion_ids"] * inputs["completion_mask"], skip_special_tokens=True)
    rewards = torch.tensor([float(len(t)) for t in texts])
    assert torch.allclose(group_advantages(rewards, 4), inputs["advantages"], atol=1e-5)
    # Off-policy: perturb the policy so ratios move and clipping bites, as trl's second iteration would see.
    n = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        old = token_logps(_ours(root, "policy"), ids, mask, completion, temperature=temperature)
        for p in trainer.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trainer.model.save_pretrained(root / "moved")
    inputs["old_per_token_logps"] = old[:, -n:]
    expected = float(trainer._compute_loss(trainer.model, inputs))
    logps = token_logps(_ours(root, "moved"), ids, mask, completion, temperature=temperature)[:, -n:]
    loss, _ = grpo_loss(logps, old[:, -n:], inputs["advantages"], inputs["completion_mask"], beta=0.04,
                        ref_logps=inputs["ref_per_token_logps"], loss_type="grpo")
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    # The objective the recipe trains with, on the whole-width batch (prompt columns unscored).
    ref = torch.cat([torch.zeros(len(ids), ids.shape[1] - 1 - n), inputs["ref_per_token_logps"]], 1)
    batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion, "old_logps": old,
             "advantages": inputs["advantages"], "ref_logps": ref, "rewards": rewards}
    loss, _ = GRPOObjective(beta=0.04, loss_type="grpo", temperature=temperature)(_ours(root, "moved"), batch)
    assert float(loss) == pytest.approx(expected, abs=1e-5)
