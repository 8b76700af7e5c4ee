"""Distillation: GKD's generalised JSD equal to trl's, Hinton's loss with its T² factor, feature matching across
widths and depths, on-policy and sequence-level batches, students cut from their teacher, and mismatched
vocabularies refused."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmstack.compress.distill import (IGNORE_INDEX, DistillObjective, attention_map, check_same_vocabulary,
                                      generalized_jsd_loss, kd_loss, layer_pairs)
from lmstack.compress.structured import keep_layers
from lmstack.errors import ConfigError
from lmstack.models import DecoderConfig, build_model

TEACHER = DecoderConfig(vocab_size=80, dim=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
STUDENT = DecoderConfig(vocab_size=80, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)


def _models():
    torch.manual_seed(0)
    return build_model(TEACHER).eval(), build_model(STUDENT).train()


def _logits_and_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 7, 30, generator=g) * 2, torch.randn(2, 7, 30, generator=g) * 2
    labels = torch.randint(0, 30, (2, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    return s, t, labels


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trl(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd")
    s, t, labels = _logits_and_labels()
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(generalized_jsd_loss(s, t, labels, beta, temperature), theirs, atol=1e-6, rtol=1e-6)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature)  # every position
    torch.testing.assert_close(generalized_jsd_loss(s, t, None, beta, temperature), theirs, atol=1e-6, rtol=1e-6)


def test_kd_loss_is_t_squared_forward_kl_plus_hard_labels():
    s, t, labels = _logits_and_labels(1)
    T, alpha = 2.0, 0.3
    scored = labels != IGNORE_INDEX
    p_t = F.softmax(t[scored] / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s[scored] / T, -1))).sum(-1).mean()
    ce = F.cross_entropy(s[scored], labels[scored])
    loss, kl_term, ce_term = kd_loss(s, t, labels, T, alpha)
    torch.testing.assert_close(loss, alpha * T * T * kl + (1 - alpha) * ce)
    torch.testing.assert_close(kl_term, kl)
    # trl's JSD at beta=0 is the same forward KL, without the T^2 factor (REFERENCES.md).
    torch.testing.assert_close(kd_loss(s, t, labels, T, 1.0)[0], T * T * generalized_jsd_loss(s, t, labels, 0.0, T))


def test_layer_pairs_spread_the_student_over_the_teacher():
    assert layer_pairs(2, 4) == [(0, 1), (1, 3)]
    assert layer_pairs(3, 12) == [(0, 3), (1, 7), (2, 11)]


def test_attention_map_is_causal_and_normalised():
    teacher, _ = _models()
    captured = {}
    attn = teacher.layers[1].attn
    handle = attn.register_forward_pre_hook(lambda m, args: captured.update(m=attention_map(m, *args[:3])))
    teacher(torch.randint(0, 80, (2, 9)))
    handle.remove()
    m = captured["m"]
    assert m.shape == (2, 9, 9)
    torch.testing.assert_close(m.sum(-1), torch.ones(2, 9))
    assert torch.all(torch.triu(m, diagonal=1) == 0)


def test_feature_matching_across_widths_trains_the_projections_and_lowers_the_divergence():
    teacher, student = _models()
    # Random-init hidden states are small (std ~0.02) and attention near uniform: large weights make them count.
    objective = DistillObjective(teacher, student, loss="jsd", alpha=0.9, hidden_weight=100.0,
                                 attention_weight=1000.0)
    assert student.distill_projections.maps[0].weight.shape == (48, 32)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 80, (4, 17), generator=g)
    batch = (ids[:, :-1], ids[:, 1:])
    first, first_loss = None, None
    for _ in range(30):
        loss, metrics = objective(student, batch)
        loss.backward()
        assert student.distill_projections.maps[1].weight.grad is not None
        optimizer.step()
        optimizer.zero_grad()
        first, first_loss = first or metrics, first_loss or float(loss)
    assert {"distill_hidden_mse", "distill_attention_kl", "distill_divergence", "tokens"} <= set(metrics)
    assert float(loss) < first_loss and metrics["distill_attention_kl"] < first["distill_attention_kl"]
    assert metrics["distill_hidden_mse"] < first["distill_hidden_mse"]
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


@pytest.mark.parametrize("mode", ["on_policy", "sequence"])
def test_generated_batches_keep_the_prompt_and_score_only_new_tokens(mode):
    teacher, student = _models()
    objective = DistillObjective(teacher, student, mode=mode, prompt_tokens=5, seed=3)
    inputs = torch.randint(0, 80, (2, 12))
    rows, targets = objective._generated(teacher if mode == "sequence" else student, inputs)
    assert rows.shape == (2, 12) and torch.equal(rows[:, :5], inputs[:, :5])
    assert torch.all(targets[:, :4] == IGNORE_INDEX) and torch.equal(targets[:, 4:-1], rows[:, 5:])
    assert student.training  # generation put it back in training mode
    loss, metrics = objective(student, (inputs, inputs))
    assert metrics["distill_generated"] == 1.0 and metrics["tokens"] == 2 * 7 and torch.isfinite(loss)


def test_a_student_cut_from_its_teacher_keeps_the_chosen_blocks():
    teacher, _ = _models()
    ids = torch.randint(0, 80, (1, 10))
    torch.testing.assert_close(keep_layers(teacher, [0, 1, 2, 3])(ids), teacher(ids))
    half = keep_layers(teacher, [1, 3])
    assert half.config.n_layers == 2
    assert torch.equal(half.layers[1].mlp.up_proj.weight, teacher.layers[3].mlp.up_proj.weight)
    with pytest.raises(ConfigError, match="distinct block indices"):
        keep_layers(teacher, [0, 0])


def test_different_vocabularies_are_refused():
    teacher, _ = _models()
    other = build_model(DecoderConfig(**{**STUDENT.__dict__, "vocab_size": 81}))
    with pytest.raises(ConfigError, match="different vocabularies"):
        DistillObjective(teacher, other)

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

    with pytest.raises(ConfigError, match="tokenizers differ"):
        check_same_vocabulary(teacher, copy.deepcopy(teacher), Tok({"a": 0, "b": 1}), Tok({"a": 0, "c": 1}))


@pytest.mark.parametrize("kwargs, message", [({"loss": "mse"}, "unknown distillation loss"),
                                             ({"mode": "offline"}, "unknown distillation mode"),
                                             ({"alpha": 1.5}, "alpha"), ({"temperature": 0}, "temperatures")])
def test_bad_distillation_settings(kwargs, message):
    teacher, student = _models()
    with pytest.raises(ConfigError, match=message):
        DistillObjective(teacher, student, **kwargs)
