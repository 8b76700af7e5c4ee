"""Mixture-of-experts routing and dispatch against per-token references; bad configs and checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.checkpoints import load_hf, save_hf
from lmstack.errors import CheckpointError, ConfigError
from lmstack.models import DecoderConfig, MoEConfig, build_model
from lmstack.nn.checkpointing import checkpoint_layers_
from lmstack.nn.moe import (MoE, Routing, TopKRouter, active_parameters, dispatch, expert_capacity, limit_capacity,
                             routing_stats)
from lmstack.train.objectives import CausalLMObjective, next_token_targets


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    moe = MoE(12, 20, 5, 2, **kw)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return moe


def _per_token(moe: MoE, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The definition, one token at a time: sum over kept slots of weight * expert(x)."""
    rows = []
    for n in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for slot in range(routing.experts.shape[1]):
            if routing.kept is None or routing.kept[n, slot]:
                y = y + routing.weights[n, slot] * moe.experts[int(routing.experts[n, slot])](x[n:n + 1])[0]
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("capacity", [None, 3])
def test_dispatch_equals_the_per_token_definition(capacity):
    moe = _moe()
    x = torch.randn(17, 12)
    routing = moe.gate(x)
    if capacity is not None:
        routing = limit_capacity(routing, capacity)
        assert routing.dropped() > 0
    torch.testing.assert_close(dispatch(x, moe.experts, routing), _per_token(moe, x, routing), atol=1e-6, rtol=1e-5)
    counts = routing.tokens_per_expert()
    assert int(counts.sum()) == 17 * 2 - routing.dropped()  # every kept assignment reaches exactly one expert
    if capacity is not None:
        assert int(counts.max()) <= capacity


def test_router_top_k_weights():
    router = TopKRouter(6, 4, 2, normalize_top_k=True)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(9, 6)
    r = router(x)
    probs = torch.softmax(x @ router.weight.T, -1)
    top, idx = probs.topk(2, -1)
    assert torch.equal(r.experts, idx)
    torch.testing.assert_close(r.weights, top / top.sum(-1, keepdim=True))
    # Shazeer's gate: softmax over the k kept logits is the same thing
    kept_logits = (x @ router.weight.T).gather(1, idx)
    torch.testing.assert_close(r.weights, torch.softmax(kept_logits, -1))
    router.normalize_top_k = False
    torch.testing.assert_close(router(x).weights, top)


def test_sigmoid_scores():
    router = TopKRouter(6, 4, 2, score="sigmoid")
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, 6)
    r = router(x)
    s = torch.sigmoid(x @ router.weight.T)
    top, idx = s.topk(2, -1)
    assert torch.equal(r.experts, idx)
    torch.testing.assert_close(r.weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(r.probabilities().sum(-1), torch.ones(5))


def test_noisy_gating_only_while_training():
    router = TopKRouter(6, 8, 2, noisy=True)
    torch.nn.init.normal_(router.weight, std=0.1)
    torch.nn.init.normal_(router.noise_weight, std=3.0)
    x = torch.randn(64, 6)
    router.eval()
    assert torch.equal(router(x).experts, router(x).experts)
    torch.testing.assert_close(router(x).logits, x @ router.weight.T)
    router.train()
    torch.manual_seed(0)
    noisy = router(x)
    assert not torch.equal(noisy.experts, router.eval()(x).experts)  # the noise changed some choices
    torch.testing.assert_close(noisy.logits, x @ router.weight.T)  # logits recorded before the noise


def test_capacity_priority_is_first_choices_first():
    """GShard's order: every token's first choice before any token's second choice."""
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])  # three tokens, two slots
    routing = Routing(torch.zeros(3, 2), torch.full((3, 2), 0.5), experts, torch.full((3, 2), 0.5))
    kept = limit_capacity(routing, 2).kept
    # expert 0 queue: t0 slot0, t2 slot0, then t1 slot1 (dropped); expert 1: t1 slot0, t0 slot1, t2 slot1 (dropped)
    assert kept.tolist() == [[True, True], [True, False], [True, False]]
    assert expert_capacity(100, 8, 2, 1.25) == 32


def test_only_chosen_experts_run():
    moe = _moe().eval()
    calls = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda module, args, out, e=e: calls.append(e))
    x = torch.randn(1, 12)
    routing = moe.gate(x)
    moe(x)
    assert sorted(calls) == sorted(routing.experts[0].tolist())  # a decode step reads 2 of 5 experts


def test_shared_expert_and_gradcheck():
    moe = _moe(shared_expert_dim=8).double()
    x = torch.randn(6, 12, dtype=torch.double, requires_grad=True)
    routing = moe.gate(x)
    shared = torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    y = torch.zeros(6, 12, dtype=torch.double)
    for n in range(6):  # the per-token definition, in fp64
        for slot in range(2):
            y[n] += routing.weights[n, slot] * moe.experts[int(routing.experts[n, slot])](x[n:n + 1])[0]
    torch.testing.assert_close(moe(x), y + shared)
    assert torch.autograd.gradcheck(lambda t: moe(t), (x,), eps=1e-6, atol=1e-5)


def test_active_parameters_count_k_of_the_experts():
    model = build_model(_tiny(top_k=1, every=2).replace(model_type="qwen2_moe"), seed=0)
    expert = sum(p.numel() for p in model.layers[1].mlp.experts[0].parameters())
    assert active_parameters(model) == sum(p.numel() for p in model.parameters()) - 3 * expert  # 1 MoE layer, 3 idle
    assert active_parameters(build_model("tiny-llama")) == sum(p.numel() for p in build_model("tiny-llama").parameters())


def test_routing_stats():
    experts = torch.tensor([[0], [0], [1], [0]])
    routing = Routing(torch.zeros(4, 2), torch.full((4, 2), 0.5), experts, torch.ones(4, 1))
    stats = routing_stats([routing])
    assert stats["moe_load_0"] == 0.75 and stats["moe_load_1"] == 0.25
    assert stats["moe_load_max"] == pytest.approx(1.5)
    assert stats["moe_router_entropy"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert stats["moe_dropped"] == 0


# --- the decoder ---------------------------------------------------------------------------------------------

def _tiny(**moe) -> DecoderConfig:
    return DecoderConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, ffn_dim=48, max_seq_len=64,
                         moe=MoEConfig(num_experts=4, expert_dim=24, **moe), model_type="mixtral")


def test_decoder_moe_layers_and_routing():
    config = _tiny(every=2).replace(model_type="qwen2_moe")
    model = build_model(config, seed=0).eval()
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["GatedMLP", "MoE", "GatedMLP"]
    ids = torch.randint(0, 64, (2, 9))
    logits, routings = model(ids, return_routing=True)
    assert len(routings) == 1 and routings[0].logits.shape == (18, 4)
    dense = build_model("tiny-llama", seed=0)
    assert dense(ids, return_routing=True)[1] == []


def test_activation_checkpointing_keeps_the_moe_loss_and_gradients():
    model = build_model(_tiny(capacity_factor=1.0, z_loss_coef=1e-3), seed=0).train()
    batch = torch.randint(0, 64, (2, 16))
    batch = (batch, next_token_targets(batch))

    def run():
        model.zero_grad()
        loss, metrics = CausalLMObjective()(model, batch)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None], metrics

    loss, grads, metrics = run()
    assert metrics["moe_dropped"] > 0 and metrics["lm_loss"] < loss
    checkpoint_layers_(model)
    loss2, grads2, _ = run()
    assert loss2 == pytest.approx(loss, abs=1e-6)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_bad_moe_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="moe.top_k=5 exceeds moe.num_experts=4"):
        _tiny(top_k=5)
    with pytest.raises(ConfigError, match=r"moe.capacity_factor=0.0 must be > 0"):
        _tiny(capacity_factor=0.0)
    with pytest.raises(ConfigError, match="moe.num_experts=0 must be a positive integer"):
        MoEConfig(num_experts=0, expert_dim=8)
    with pytest.raises(ConfigError, match="unknown moe field 'experts'; did you mean 'num_experts'"):
        DecoderConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, ffn_dim=8, moe={"experts": 4, "expert_dim": 8})
    with pytest.raises(ConfigError, match="moe.dense_layers contains 7"):
        _tiny(dense_layers=[7])
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and num_experts=2"):
        MoE(8, 8, 2, 3)
    with pytest.raises(ValueError, match="capacity_factor=-1 must be > 0"):
        MoE(8, 8, 2, 1, capacity_factor=-1)


def test_configs_transformers_cannot_express_are_refused_on_save(tmp_path):
    for moe in (dict(score="sigmoid"), dict(noisy_gating=True)):
        model = build_model(_tiny(**moe), seed=0)
        with pytest.raises(ConfigError, match="cannot be expressed"):
            save_hf(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    # Mixtral has one intermediate_size: the experts' width is the config's ffn_dim
    return save_hf(build_model(_tiny().replace(ffn_dim=24), seed=0), tmp_path_factory.mktemp("moe") / "ckpt")


def _edit(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_missing_an_expert(moe_dir, tmp_path):
    ckpt = shutil.copytree(moe_dir, tmp_path / "ckpt")
    _edit(ckpt, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.block_sparse_moe.experts.3.w2.weight"):
        load_hf(ckpt)


def test_checkpoint_with_a_router_of_the_wrong_size(moe_dir, tmp_path):
    ckpt = shutil.copytree(moe_dir, tmp_path / "ckpt")
    _edit(ckpt, lambda t: t.update({"model.layers.0.block_sparse_moe.gate.weight": torch.zeros(5, 32)}))
    wrong = r"block_sparse_moe.gate.weight. has shape \[5, 32\], but config.json implies \[4, 32\]"
    with pytest.raises(CheckpointError, match=wrong):
        load_hf(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_experts_per_tok"] = 9
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="moe.top_k=9 exceeds moe.num_experts=4"):
        load_hf(ckpt)
