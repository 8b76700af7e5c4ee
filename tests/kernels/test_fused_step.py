"""The fused C++ decode step equals the eager model step by step, and is used only where it is exact."""

import copy

import pytest
import torch

from lmstack.peft import apply_lora
from torch import nn

from lmstack.generate import GenerationConfig, generate
from lmstack.generate.engine import CausalLMEngine
from lmstack.kernels.fused_step import FusedDecodeStep, fused_step_blocker
from lmstack.models import build_model
from lmstack.models.config import DecoderConfig
from lmstack.nn.kv_cache import StaticKVCache
from lmstack.kernels import load_cpu_kernels, use_skinny_linears_

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernels cannot be built here")

BASE = dict(vocab_size=96, dim=48, n_layers=2, n_heads=6, ffn_dim=80, max_seq_len=64)
CONFIGS = {
    "gpt2": dict(norm="layernorm", mlp="plain", activation="gelu_tanh", position="learned", qkv_bias=True,
                 out_bias=True, mlp_bias=True),
    "llama-gqa": dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", n_kv_heads=2),
    "qwen2-window": dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", n_kv_heads=3,
                         qkv_bias=True, sliding_window=5, sliding_window_layers=(1,)),
    "mqa-gelu-sinusoidal": dict(norm="layernorm", norm_bias=False, mlp="plain", activation="gelu",
                                position="sinusoidal", n_kv_heads=1),
    "relu-no-positions": dict(norm="layernorm", mlp="plain", activation="relu", position="none"),
    "qwen3-qk-norm": dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", n_kv_heads=3, head_dim=12,
                          qk_norm=True),
    # head widths of 32 / 64 / 128 take the attention kernel's register-held paths, others the general one
    "llama-head-dim-64": dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", n_kv_heads=2,
                              head_dim=64),
    "window-head-dim-32": dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", n_kv_heads=3,
                               head_dim=32, sliding_window=4, sliding_window_layers=(0,)),
    "gpt-head-dim-128": dict(norm="layernorm", mlp="plain", activation="gelu", position="learned", n_kv_heads=2,
                             head_dim=128),
}

MOE = {
    "mixtral": dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", n_kv_heads=2,
                    moe=dict(num_experts=5, expert_dim=40, top_k=2)),
    "qwen2-moe-shared-every-2nd": dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", qkv_bias=True,
                                       moe=dict(num_experts=6, expert_dim=24, top_k=3, normalize_top_k=False,
                                                shared_expert_dim=56, every=2)),
    "gelu-sigmoid-top1-ungated-shared": dict(norm="layernorm", mlp="plain", activation="gelu", position="learned",
                                             moe=dict(num_experts=4, expert_dim=32, top_k=1, score="sigmoid",
                                                      shared_expert_dim=16, shared_expert_gate=False)),
    "qwen3-moe": dict(norm="rmsnorm", mlp="gated", activation="silu", position="rope", n_kv_heads=2, qk_norm=True,
                      moe=dict(num_experts=6, expert_dim=24, top_k=2, every=2)),
}
CONFIGS.update(MOE)


def _models(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    eager = build_model(DecoderConfig(**BASE, **CONFIGS[name])).eval()
    with torch.no_grad():  # unit-gain weights: attention far from uniform, so position bugs show
        for name, p in eager.named_parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            elif name.endswith("norm.weight"):  # norm weights away from 1, so a swapped norm shows
                p.normal_(1.0, 0.2)
    return eager, use_skinny_linears_(copy.deepcopy(eager))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_each_step_matches_the_eager_model(name, rows):
    eager, fast = _models(name)
    assert fused_step_blocker(fast, rows) is None
    T, steps = 6, 9
    ids = torch.randint(0, 96, (rows, T + steps), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones(rows, T + steps, dtype=torch.long)
    mask[-1, :2] = 0  # the last row is left-padded
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    caches = [StaticKVCache.for_model(eager, rows, T + steps) for _ in range(2)]
    step = FusedDecodeStep(fast)
    with torch.inference_mode():
        for model, cache in zip((eager, fast), caches):
            model(ids[:, :T], attention_mask=mask[:, :T], position_ids=positions[:, :T], kv_cache=cache)
        for t in range(T, T + steps):
            want = eager(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                         kv_cache=caches[0])[:, -1]
            got = step(ids[:, t], positions[:, t:t + 1], caches[1], mask)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert caches[1].length == T + steps
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-5, rtol=1e-5)


def test_generation_uses_the_fused_step_and_gives_the_same_tokens():
    eager, fast = _models("llama-gqa")
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    assert CausalLMEngine(fast, ids, mask, 4).fused_step is not None
    assert CausalLMEngine(eager, ids, mask, 4).fused_step is None
    for config in (GenerationConfig(max_new_tokens=12, eos_token_id=[]),
                   GenerationConfig(max_new_tokens=12, do_sample=True, top_k=10, seed=3, eos_token_id=[]),
                   GenerationConfig(max_new_tokens=8, num_beams=3, eos_token_id=[])):
        assert torch.equal(generate(fast, ids, config, attention_mask=mask),
                           generate(eager, ids, config, attention_mask=mask))


def test_a_step_made_before_weights_change_in_place_reads_the_new_weights():
    """The step converts its weight list to C++ once; in-place changes (copy_, .data swapped) are still seen."""
    eager, fast = _models("llama-gqa")
    step = FusedDecodeStep(fast)
    with torch.no_grad():
        eager.layers[0].mlp.down_proj.weight.mul_(-0.5)
        eager.layers[1].attn.q_proj.weight.mul_(-0.5)
        fast.layers[0].mlp.down_proj.weight.copy_(eager.layers[0].mlp.down_proj.weight)
        fast.layers[1].attn.q_proj.weight.data = eager.layers[1].attn.q_proj.weight.detach().clone()
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    caches = [StaticKVCache.for_model(eager, 1, 6) for _ in range(2)]
    with torch.inference_mode():
        for model, cache in zip((eager, fast), caches):
            model(ids[:, :4], kv_cache=cache)
        want = eager(ids[:, 4:5], position_ids=torch.tensor([[4]]), kv_cache=caches[0])[:, -1]
        torch.testing.assert_close(step(ids[:, 4], torch.tensor([[4]]), caches[1], None), want, atol=1e-4, rtol=1e-4)


class _Wrapped(nn.Module):
    """Stands for an adapter around a projection (LoRA, quantization): the fused step must not skip it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 1.0


def test_falls_back_wherever_it_would_not_be_exact():
    eager, fast = _models("gpt2")
    assert fused_step_blocker(eager, 1) == ("lm_head is not a SkinnyLinear or quantized linear (call "
                                            "use_skinny_linears_), or carries an adapter")
    assert "rows" in fused_step_blocker(fast, 9)
    wrapped = copy.deepcopy(fast)
    wrapped.layers[1].attn.v_proj = _Wrapped(wrapped.layers[1].attn.v_proj)
    assert fused_step_blocker(wrapped, 1) == ("layer 1: a projection is not a SkinnyLinear or quantized linear, or "
                                              "carries an adapter (LoRA, IA3)")
    ids = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(max_new_tokens=6, eos_token_id=[])
    unwrapped_tokens = generate(fast, ids, config)
    assert not torch.equal(generate(wrapped, ids, config), unwrapped_tokens)  # the adapter took effect
    # A LoRA layer over a SkinnyLinear still offers the kernel's class, but must not be read as one.
    adapted = apply_lora(copy.deepcopy(fast), targets=["v_proj"], rank=2)
    torch.nn.init.normal_(adapted.layers[0].attn.v_proj.lora_B.weight)
    assert "carries an adapter" in fused_step_blocker(adapted, 1)
    assert not torch.equal(generate(adapted, ids, config), unwrapped_tokens)
    dropout = use_skinny_linears_(build_model(DecoderConfig(**BASE, **CONFIGS["gpt2"], dropout=0.1)))
    assert fused_step_blocker(dropout.train(), 1) == "dropout is active (model in training mode)"
    assert fused_step_blocker(dropout.eval(), 1) is None
    alibi = use_skinny_linears_(build_model(DecoderConfig(**BASE, norm="layernorm", position="alibi")))
    assert fused_step_blocker(alibi, 1) == "ALiBi positions"


@pytest.mark.parametrize("name", list(MOE))
def test_mixture_of_experts_step_reads_only_the_chosen_experts(name):
    """Every expert the step's rows did not choose is poisoned with NaN: reading any of it would show."""
    eager, fast = _models(name)
    assert fused_step_blocker(fast, 2) is None
    assert "training mode" in fused_step_blocker(copy.deepcopy(fast).train(), 2)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(8).expand(2, 8)
    caches = [StaticKVCache.for_model(eager, 2, 8) for _ in range(2)]
    with torch.inference_mode():
        for model, cache in zip((eager, fast), caches):
            model(ids[:, :7], kv_cache=cache)
        want, routings = eager(ids[:, 7:], position_ids=positions[:, 7:], kv_cache=caches[0], return_routing=True)
        moe_layers = [layer.mlp for layer in fast.layers if type(layer.mlp).__name__ == "MoE"]
        for moe, routing in zip(moe_layers, routings, strict=True):
            chosen = set(routing.experts.flatten().tolist())
            assert len(chosen) < moe.num_experts
            for e in set(range(moe.num_experts)) - chosen:
                for p in moe.experts[e].parameters():
                    p.fill_(float("nan"))
        got = FusedDecodeStep(fast)(ids[:, 7], positions[:, 7:], caches[1], None)
    torch.testing.assert_close(got, want[:, -1], atol=1e-4, rtol=1e-4)
    config = GenerationConfig(max_new_tokens=10, eos_token_id=[])
    eager, fast = _models(name)
    assert torch.equal(generate(fast, ids, config), generate(eager, ids, config))
