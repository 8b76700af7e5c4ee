"""Mixtures of experts against transformers 5.24 on the same weights (REFERENCES.md section 4).

Logits and greedy tokens are in test_decoder_parity.py / test_generate_parity.py (Mixtral and Qwen2-MoE
cases); here: the router logits, the load-balancing loss (with and without padding), the training loss
with the auxiliary term and its gradients, and Switch Transformers' loss functions and capacity routing.
"""

import pytest
import torch

from lmstack.checkpoints import load_hf
from lmstack.nn.moe import MoE, Routing, load_balancing_loss, router_scores, router_z_loss
from lmstack.train.objectives import CausalLMObjective, next_token_targets
from tests.parity.hf_reference import make_hf_model, save_hf_model, transformers

V = 80
ATOL = 1e-4

CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.02),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=48, mlp_only_layers=[1],
        router_aux_loss_coef=0.05),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    ref = make_hf_model(CONFIGS[request.param]())
    return ref, load_hf(save_hf_model(ref, tmp_path_factory.mktemp(request.param)))


def _batch():
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    return ids, mask


def test_router_logits_and_moe_layers_match(pair):
    ref, ours = pair
    ids, _ = _batch()
    with torch.no_grad():
        theirs = ref(ids, output_router_logits=True).router_logits
        logits, routings = ours(ids, return_routing=True)
    moe_layers = [i for i in range(ours.config.n_layers) if ours.config.is_moe_layer(i)]
    assert len(routings) == len(theirs) == len(moe_layers)
    for mine, hf in zip(routings, theirs):
        assert torch.allclose(mine.logits, hf.float(), atol=ATOL)
    assert torch.equal(logits, ours(ids))  # asking for the routing does not change the logits


@pytest.mark.parametrize("padded", [False, True])
def test_load_balancing_loss_matches(pair, padded):
    ref, ours = pair
    ids, mask = _batch()
    mask = mask if padded else None
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, output_router_logits=True)
        _, routings = ours(ids, attention_mask=mask, return_routing=True)
    theirs = transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func(
        out.router_logits, ours.config.moe.num_experts, ours.config.moe.top_k, mask)
    assert torch.allclose(out.aux_loss, theirs)
    assert torch.allclose(load_balancing_loss(routings, mask), theirs, atol=1e-6)


def test_training_loss_and_gradients_match(pair):
    """The objective's loss = cross-entropy + coef * aux, as transformers' ``loss`` with labels and router
    logits; the gradients of every matching parameter agree."""
    ref, ours = pair
    ids, _ = _batch()
    ref.train(), ours.train()
    out = ref(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    loss, metrics = CausalLMObjective()(ours, (ids, next_token_targets(ids)))
    loss.backward()
    assert abs(float(loss.detach()) - float(out.loss.detach())) < ATOL
    assert abs(metrics["moe_aux_loss"] - float(out.aux_loss)) < 1e-5
    assert metrics["lm_loss"] < float(loss)  # the auxiliary term was added
    pairs = list(_gradient_pairs(ref, ours))
    assert len(pairs) > 4 * ours.config.moe.num_experts  # embeddings, attention, routers, every expert
    for name, mine, theirs in pairs:
        assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-3), name
    ours.eval(), ref.eval()
    ref.zero_grad(), ours.zero_grad()


def _gradient_pairs(ref, ours):
    """(name, our gradient, transformers' gradient) for the embedding, each query projection, each router
    and each expert (transformers 5 stacks experts: gate_up_proj (E, 2I, C), down_proj (E, C, I))."""
    hf = dict(ref.named_parameters())

    def grad(p):
        return p.grad if p.grad is not None else torch.zeros_like(p)  # an expert no token chose

    yield "embed_tokens", grad(ours.embed_tokens.weight), grad(hf["model.embed_tokens.weight"])
    for i, layer in enumerate(ours.layers):
        prefix = f"model.layers.{i}."
        yield f"{i}.q_proj", grad(layer.attn.q_proj.weight), grad(hf[prefix + "self_attn.q_proj.weight"])
        if not isinstance(layer.mlp, MoE):
            continue
        yield f"{i}.router", grad(layer.mlp.gate.weight), grad(hf[prefix + "mlp.gate.weight"])
        gate_up, down = grad(hf[prefix + "mlp.experts.gate_up_proj"]), grad(hf[prefix + "mlp.experts.down_proj"])
        for e, expert in enumerate(layer.mlp.experts):
            mine = torch.cat([grad(expert.gate_proj.weight), grad(expert.up_proj.weight)])
            yield f"{i}.expert{e}.gate_up", mine, gate_up[e]
            yield f"{i}.expert{e}.down", grad(expert.down_proj.weight), down[e]


# --- Switch Transformers: top-1, capacity, and its loss functions --------------------------------------------

switch = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")


def _switch_config(expert_capacity: int):
    return transformers.SwitchTransformersConfig(d_model=16, d_ff=24, num_experts=4, expert_capacity=expert_capacity,
                                                 router_jitter_noise=0.0, dropout_rate=0.0, router_bias=False)


def test_switch_block_with_capacity_matches():
    """Top-1 routing with a capacity: the same tokens dropped (token order decides) and the same output."""
    torch.manual_seed(0)
    N, E, capacity = 16, 4, 3
    theirs = switch.SwitchTransformersSparseMLP(_switch_config(capacity)).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.5)
    # capacity = ceil(factor * N * k / E) = 3 exactly
    ours = MoE(16, 24, E, 1, mlp="plain", activation="relu", normalize_top_k=False, capacity_factor=capacity * E / N)
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.router.classifier.weight)
        for e in range(E):
            ours.experts[e].fc_in.weight.copy_(theirs.experts[f"expert_{e}"].wi.weight)
            ours.experts[e].fc_out.weight.copy_(theirs.experts[f"expert_{e}"].wo.weight)
    x = torch.randn(1, N, 16)
    ours.train()  # capacity applies while training
    y, routing = ours(x, return_routing=True)
    with torch.no_grad():
        kept_theirs, _, _ = theirs.router(x)
        expected = theirs(x)
    assert routing.dropped() > 0  # the test exercises dropping
    assert torch.equal(routing.kept[:, 0], kept_theirs[0].sum(-1).bool())
    assert torch.allclose(y, expected, atol=1e-5)
    ours.eval()
    assert ours(x, return_routing=True)[1].kept is None  # inference never drops


def test_switch_loss_functions_match():
    torch.manual_seed(1)
    logits = torch.randn(1, 20, 4) * 2
    probs = torch.softmax(logits, -1)
    experts = probs.argmax(-1)
    routing = Routing(logits[0], router_scores(logits[0], "softmax"), experts[0][:, None],
                      probs.max(-1).values[0][:, None])
    assert torch.allclose(load_balancing_loss([routing]), switch.load_balancing_loss_func(probs, experts), atol=1e-6)
    assert torch.allclose(router_z_loss([routing]), switch.router_z_loss_func(logits), atol=1e-5)
