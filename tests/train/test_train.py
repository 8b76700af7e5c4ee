"""Objective, optimizer groups, schedule, accumulation, checkpoints and their failure modes."""

import copy
import math

import pytest
import torch

from lmstack.checkpoints import train_state
from lmstack.checkpoints.train_state import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint
from lmstack.data import PackedBlocks, open_split, write_token_shards
from lmstack.errors import CheckpointError, ConfigError, NumericalError
from lmstack.models import build_model
from lmstack.models.config import DecoderConfig
from lmstack.train import (IGNORE_INDEX, CausalLMObjective, TrainConfig, Trainer, causal_lm_loss, linear_cross_entropy,
                           next_token_targets,
                           param_groups, warmup_cosine)
from lmstack.train.trainer import autocast_dtype

TINY = DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=32, norm="layernorm",
                     mlp="plain", activation="gelu_tanh", position="learned", qkv_bias=True, out_bias=True,
                     mlp_bias=True, model_type="gpt2")


def _data(tmp_path):
    g = torch.Generator().manual_seed(0)
    texts = ["".join(chr(65 + int(i)) for i in torch.randint(0, 20, (400,), generator=g)) for _ in range(3)]
    directory = write_token_shards(tmp_path / "data", {"train": texts}, lambda t: [ord(c) - 60 for c in t],
                                   vocab_size=64, eos_id=0, fingerprint={})
    return open_split(directory, "train")


def test_targets_and_loss():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert next_token_targets(ids, mask).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    logits = torch.randn(1, 4, 10)
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 3]])
    expected = -(torch.log_softmax(logits[0], -1)[[0, 1, 3], [1, 2, 3]]).mean()
    torch.testing.assert_close(causal_lm_loss(logits, targets), expected)


def test_param_groups_decay_matrices_only_and_count_tied_once():
    model = build_model(TINY, seed=0)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p is model.embed_tokens.weight for p in decay["params"]) == 1  # tied with lm_head


def test_warmup_cosine_shape():
    values = [warmup_cosine(s, 10, 110, 0.1) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


def _trainer(tmp_path, data, model, **overrides):
    config = TrainConfig(**{"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "checkpoint_every": 100,
                            "progress": False, **overrides})
    loader = PackedBlocks(data, block_size=16, batch_size=config.batch_size, seed=0)
    return Trainer(model, CausalLMObjective(), loader, config, tmp_path / "run")


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    data = _data(tmp_path)
    base = build_model(TINY, seed=0)
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    _trainer(tmp_path / "a", data, one, batch_size=8, max_steps=2).fit()
    _trainer(tmp_path / "b", data, two, batch_size=4, grad_accum=2, max_steps=2).fit()
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    assert not all(torch.equal(p, q) for p, q in zip(base.parameters(), one.parameters()))


class _Rows:
    """SFT-like dict batches cut in order from fixed rows whose scored tokens differ (1 to 12 per row)."""

    def __init__(self, batch_size: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.rows, self.batch_size, self.position = [], batch_size, 0
        for scored in (1, 12, 3, 9, 2, 7, 12, 4):
            ids = torch.randint(1, 64, (16,), generator=g)
            labels = torch.full((16,), IGNORE_INDEX)
            labels[:scored] = torch.randint(1, 64, (scored,), generator=g)
            self.rows.append((ids, labels))

    def next_batch(self) -> dict:
        rows = [self.rows[(self.position + i) % len(self.rows)] for i in range(self.batch_size)]
        self.position += self.batch_size
        return {"input_ids": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_accumulation_weighs_micro_batches_by_their_scored_tokens(tmp_path):
    """Rows with 1 to 12 scored tokens: two micro-batches of 2 make the same update and log the same loss as one
    batch of 4 (the mean over every scored token of the step, not the mean of the two micro-batch means)."""
    base = build_model(TINY, seed=0)
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    config = dict(max_steps=2, warmup_steps=1, eval_every=0, checkpoint_every=100, progress=False)
    first = Trainer(one, CausalLMObjective(), _Rows(4), TrainConfig(batch_size=4, **config), tmp_path / "a").fit()
    second = Trainer(two, CausalLMObjective(), _Rows(2), TrainConfig(batch_size=2, grad_accum=2, **config),
                     tmp_path / "b").fit()
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-5)
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    # Weighing the micro-batches equally (an objective without loss_items) moves the weights elsewhere: the
    # first two rows hold 1 and 12 scored tokens, the next two 3 and 9.
    unweighted = copy.deepcopy(base)
    Trainer(unweighted, lambda model, batch: CausalLMObjective()(model, batch), _Rows(2),
            TrainConfig(batch_size=2, grad_accum=2, **config), tmp_path / "c").fit()
    assert max(float((p - q).detach().abs().max()) for p, q in zip(one.parameters(), unweighted.parameters())) > 1e-4
    assert CausalLMObjective().loss_items(_Rows(4).next_batch()) == 1 + 12 + 3 + 9


def test_a_step_without_scored_tokens_is_named(tmp_path):
    source = _Rows(2)
    for ids, labels in source.rows:
        labels.fill_(IGNORE_INDEX)
    trainer = Trainer(build_model(TINY, seed=0), CausalLMObjective(), source,
                      TrainConfig(max_steps=1, batch_size=2, eval_every=0, progress=False), tmp_path)
    with pytest.raises(NumericalError, match="no scored items"):
        trainer.fit()


def test_loss_decreases_and_metrics_are_logged(tmp_path):
    data = _data(tmp_path)
    trainer = _trainer(tmp_path, data, build_model(TINY, seed=0), max_steps=40, lr=3e-3)
    trainer.fit()
    records = [eval(line.replace("null", "None")) for line in trainer.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert sum(r["loss"] for r in records[-5:]) / 5 < records[0]["loss"] - 0.5
    assert {"lr", "grad_norm", "tokens", "tokens_per_s"} <= records[0].keys()


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = build_model(TINY, seed=0)
    good = save_checkpoint(tmp_path, 10, model, {"step": 10})

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_state.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 20, model, {"step": 20})
    assert checkpoint_dirs(tmp_path) == [good] and latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000010"]  # no temporary left
    monkeypatch.undo()
    assert load_checkpoint(good, build_model(TINY, seed=1))["step"] == 10


def test_corrupted_or_mismatched_checkpoints_are_clear_errors(tmp_path):
    model = build_model(TINY, seed=0)
    checkpoint = save_checkpoint(tmp_path, 5, model, {"step": 5})
    other = build_model(TINY, seed=3)
    load_checkpoint(checkpoint, other)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    bigger = build_model(DecoderConfig(**{**TINY.__dict__, "dim": 64}), seed=0)
    with pytest.raises(CheckpointError, match="different model architecture"):
        load_checkpoint(checkpoint, bigger)
    state = checkpoint / "train_state.pt"
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="train_state.pt is corrupted"):
        load_checkpoint(checkpoint, other)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(checkpoint, other)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match="bf16"):
        autocast_dtype("bf16", torch.device("cpu"))
    assert autocast_dtype("auto", torch.device("cpu")) is None  # never bf16 on a CPU


def test_fused_head_and_loss_equal_the_logits_path():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[::4] = IGNORE_INDEX
    want = causal_lm_loss((hidden @ weight.T)[None], targets[None])
    grads = torch.autograd.grad(want * 3, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, chunk_rows=5)  # chunks that do not divide 37
    torch.testing.assert_close(got, want)
    for mine, theirs in zip(torch.autograd.grad(got * 3, (hidden, weight)), grads):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_objective_fuses_only_a_plain_head_and_gives_the_same_gradients():
    model = build_model(TINY, seed=0)
    inputs = torch.randint(0, 64, (2, 12))
    targets = torch.roll(inputs, -1, 1)
    loss, metrics = CausalLMObjective()(model, (inputs, targets))
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    causal_lm_loss(model(inputs), targets).backward()
    for name, p in model.named_parameters():  # the tied embedding gets both of its gradient terms
        torch.testing.assert_close(fused[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert metrics["tokens"] == 24
    with torch.no_grad():  # no gradients: the logits path
        torch.testing.assert_close(CausalLMObjective()(model, (inputs, targets))[0], loss.detach())
