"""A whole decoding step as one C++ call, for Decoder models on CPU.

A batch-1 decode step is memory-bound: it should cost the time to stream every weight once. In eager
PyTorch a 12-layer model also pays ~150 operator dispatches per step, during which the memory bus sits
idle (measured: ~25% of the step for GPT-2-124M). ``kernels/csrc/decode_step.cpp`` runs the blocks, the final
norm and the LM head in one call with the skinny-matmul kernels; embeddings, positions and RoPE angles
stay in Python, where each family differs.

It is used by the decoding engine for models transformed with ``use_skinny_linears_`` (the opt-in to
the CPU decoding kernels) whenever ``fused_step_blocker`` finds nothing in the way: 1-8 rows, fp32
activations on CPU, a structure this step reproduces exactly (no ALiBi, no adapters or other wrapped
layers), no dropout. A mixture-of-experts feed-forward (``lmstack.nn.moe.MoE``, in eval mode) runs in the
step too: router, top-k and only the chosen experts' weights, per row; so do Qwen3's per-head q/k norms.
Every linear must offer ``decode_operands()``: a SkinnyLinear (fp32 weight) or an
``lmstack.compress.QuantizedLinear`` (int8 / int4 / NF4 codes, read by the same step). Otherwise
decoding takes the eager path, which gives the same tokens.
"""

import torch
from torch import nn

from lmstack.models.decoder import Decoder
from lmstack.nn.attention import Attention
from lmstack.nn.kv_cache import StaticKVCache
from lmstack.nn.mlp import MLP, GatedMLP
from lmstack.nn.moe import MoE
from lmstack.nn.norms import RMSNorm
from lmstack.kernels.build import load_cpu_kernels
from lmstack.kernels.skinny_linear import FP32, MAX_ROWS, DecodeOperands

# Values of the Epilogue enum in csrc/skinny_kernels.h.
_ACTIVATION_CODES = {"gelu": 2, "gelu_tanh": 3, "silu": 4, "relu": 5}
_NONE = torch.empty(0)
_NORM_SLOTS = (0, 5, 9, 10)  # the norms among _layer_modules' entries (the rest are the 7 linears)


def fused_step_blocker(model: nn.Module, batch_size: int) -> str | None:
    """Why ``model`` cannot decode ``batch_size`` rows through the fused step, or None if it can."""
    if not isinstance(model, Decoder):
        return "not a Decoder"
    if getattr(model, "transform_name", None) is not None:  # prompt learning: virtual tokens the kernel ignores
        return f"the model carries {model.transform_name}"
    config = model.config
    if not 1 <= batch_size <= MAX_ROWS:
        return f"{batch_size} rows (the kernels take 1 to {MAX_ROWS})"
    if config.position == "alibi":
        return "ALiBi positions"
    if config.activation not in _ACTIVATION_CODES:
        return f"activation {config.activation!r}"
    if model.training and config.dropout > 0:
        return "dropout is active (model in training mode)"
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return "parameters are not all fp32 on CPU"
    if any((b.is_floating_point() and b.dtype != torch.float32) or b.device.type != "cpu" for b in model.buffers()):
        return "buffers (e.g. quantization scales) are not all fp32 on CPU"
    if not kernel_layer(model.lm_head):
        return "lm_head is not a SkinnyLinear or quantized linear (call use_skinny_linears_), or carries an adapter"
    for layer in model.layers:
        reason = _layer_blocker(layer, config.mlp)
        if reason:
            return f"layer {layer.layer_idx}: {reason}"
    # Last: only a model already set up for the kernels may trigger their (first-use) build.
    if load_cpu_kernels() is None:
        return "the C++ kernels cannot be built on this machine"
    return None


def _layer_blocker(layer: nn.Module, mlp_kind: str) -> str | None:
    """Exact module types only: a LoRA-wrapped or quantized layer must not be silently skipped."""
    attn, mlp = layer.attn, layer.mlp
    if type(attn) is not Attention:
        return f"attention is a {type(attn).__name__}"
    if attn.scale is not None:
        return f"attention scale {attn.scale} (the kernel uses 1/sqrt(head_dim))"
    for norm in (attn.q_norm, attn.k_norm):
        if norm is not None and (type(norm) is not RMSNorm or norm.unit_offset):
            return f"a query/key norm is a {type(norm).__name__}"
    if type(mlp) is MoE:
        reason = _mixture_blocker(mlp, mlp_kind)
        if reason:
            return reason
    elif type(mlp) not in (MLP, GatedMLP):
        return f"feed-forward is a {type(mlp).__name__}"
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *_mlp_linears(mlp)]
    if not all(kernel_layer(linear) for linear in linears):
        return "a projection is not a SkinnyLinear or quantized linear, or carries an adapter (LoRA, IA3)"
    for norm in (layer.attn_norm, layer.mlp_norm):
        if type(norm) not in (nn.LayerNorm, RMSNorm) or getattr(norm, "unit_offset", False):
            return f"norm is a {type(norm).__name__}"
    return None


def _mixture_blocker(moe: MoE, kind: str) -> str | None:
    """What keeps a mixture of experts off the fused step: training-time routing (noise, jitter, capacity
    limits) or experts of another kind than the decoder's MLP (the step has one ``gated`` flag)."""
    if moe.training:
        return "a mixture of experts in training mode (noisy routing, jitter or capacity limits)"
    expected = GatedMLP if kind == "gated" else MLP
    experts = [*moe.experts, *([moe.shared_expert] if moe.shared_expert is not None else [])]
    if any(type(expert) is not expected for expert in experts):
        return f"an expert is not a {expected.__name__}"
    return None


def kernel_layer(module: nn.Module) -> bool:
    """True for a layer the fused step reads as it is (its ``decode_operands`` method). A PEFT-adapted layer
    sets the attribute to None: its output is more than its base weights'."""
    return getattr(module, "decode_operands", None) is not None


def _feed_forward_slots(mlp: nn.Module) -> list[nn.Module | None]:
    """A dense MLP's linears in the step's order: in, up (None unless gated), out."""
    if isinstance(mlp, GatedMLP):
        return [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return [mlp.fc_in, None, mlp.fc_out]


def _mlp_linears(mlp: nn.Module) -> list[nn.Module]:
    if isinstance(mlp, MoE):
        return [linear for module in _mixture_modules(mlp) for linear in _mlp_linears(module)]
    if not isinstance(mlp, (MLP, GatedMLP)):  # the shared expert's gate: a lone linear
        return [mlp]
    return [linear for linear in _feed_forward_slots(mlp) if linear is not None]


def _mixture_modules(moe: MoE) -> list[nn.Module]:
    """The experts, then the shared expert and its gate where present (decode_step.cpp's Experts order)."""
    return [*moe.experts, *[m for m in (moe.shared_expert, moe.shared_expert_gate) if m is not None]]


def _operands(module: nn.Module | None) -> DecodeOperands:
    """A linear's decode operands; an absent one (an ungated MLP's up) is an empty fp32 one."""
    return module.decode_operands() if module is not None else DecodeOperands(_NONE, None, FP32, 0, [])


def _mlp_operands(module: nn.Module) -> list[DecodeOperands]:
    """in, up, out of an expert; a lone linear (the shared expert's gate)."""
    if isinstance(module, (MLP, GatedMLP)):
        return [_operands(linear) for linear in _feed_forward_slots(module)]
    return [module.decode_operands()]


class FusedDecodeStep:
    """Decodes one token per row for a Decoder that ``fused_step_blocker`` accepts.

    The weight list is built once, of the Parameter objects themselves, so weights loaded or moved in
    place later (``.data`` swapped, ``copy_``) are still the ones read.
    """

    def __init__(self, model: Decoder) -> None:
        self.model = model
        self.kernel = load_cpu_kernels()
        config = model.config
        self.weights = [t for layer in model.layers for t in self._layer_weights(layer)]
        head = model.lm_head.decode_operands()
        self.weights += [model.norm.weight, _or_none(getattr(model.norm, "bias", None)), head.weight]
        linears = [op for layer in model.layers for op in self._layer_linears(layer)] + [head]
        self.aux = [t for op in linears for t in op.aux]
        self.formats = [v for op in linears for v in (op.format, op.group)]
        self.windows = [layer.sliding_window or 0 for layer in model.layers]
        self.moe_shape, self.moe_weights, self.moe_aux, self.moe_formats = [], [], [], []
        for layer in model.layers:
            self._add_mixture(layer.mlp)
        self.shape = [config.n_heads, config.n_kv_heads, int(config.norm == "rmsnorm"), int(config.mlp == "gated"),
                      _ACTIVATION_CODES[config.activation]]
        self.eps = float(config.norm_eps)
        # converted to C++ once: handles of the same tensors, so in-place weight changes are still seen
        self._model_args = self.kernel.DecodeStepModel(self.weights, self.windows, self.shape, self.eps, self.aux,
                                                       self.formats, self.moe_weights, self.moe_aux, self.moe_formats,
                                                       self.moe_shape)

    def _add_mixture(self, mlp: nn.Module) -> None:
        """A layer's entry of the step's mixture-of-experts arguments (6 zeros for a dense layer)."""
        if not isinstance(mlp, MoE):
            self.moe_shape += [0] * 6
            return
        router = mlp.gate
        self.moe_shape += [mlp.num_experts, router.top_k, int(router.normalize_top_k), int(router.score == "sigmoid"),
                           int(mlp.shared_expert is not None), int(mlp.shared_expert_gate is not None)]
        self.moe_weights.append(router.weight)
        for operands in (op for module in _mixture_modules(mlp) for op in _mlp_operands(module)):
            self.moe_weights += [operands.weight, _or_none(operands.bias)]
            self.moe_aux += operands.aux
            self.moe_formats += [operands.format, operands.group]

    @staticmethod
    def _layer_modules(layer: nn.Module) -> list[nn.Module | None]:
        """attn norm, q, k, v, o, mlp norm, mlp in, mlp up (None unless gated), mlp out (all three None for a
        mixture of experts: ``_add_mixture``), the per-head query and key norms (None unless Qwen3-like)."""
        attn, mlp = layer.attn, layer.mlp
        feed_forward = [None] * 3 if isinstance(mlp, MoE) else _feed_forward_slots(mlp)
        return [layer.attn_norm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp_norm, *feed_forward,
                attn.q_norm, attn.k_norm]

    @classmethod
    def _layer_weights(cls, layer: nn.Module) -> list[torch.Tensor]:
        """In the LayerSlot order of decode_step.cpp (a linear's weight as its decode operands give it: fp32
        or packed codes); an absent tensor is an empty one."""
        tensors = []
        for module in cls._layer_modules(layer):
            if hasattr(module, "decode_operands"):
                operands = module.decode_operands()
                tensors += [operands.weight, _or_none(operands.bias)]
            else:
                tensors += [_or_none(getattr(module, "weight", None)), _or_none(getattr(module, "bias", None))]
        return tensors

    @classmethod
    def _layer_linears(cls, layer: nn.Module) -> list[DecodeOperands]:
        """The 7 linears' operands (q, k, v, o, mlp in, up, out); an absent up is an empty fp32 one."""
        modules = cls._layer_modules(layer)
        return [_operands(m) for i, m in enumerate(modules) if i not in _NORM_SLOTS]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                 key_mask: torch.Tensor | None) -> torch.Tensor:
        """Feed one token per row and advance ``cache`` by one slot.

        Args:
            tokens: (B,) ids; positions: (B, 1) their positions.
            cache: the StaticKVCache holding the earlier tokens (batch B).
            key_mask: (B, >= cache.length + 1) int64, 0 for padding slots, or None.
        Returns:
            next-token logits (B, V) in float32.
        """
        model = self.model
        x = model.embed_tokens(tokens)  # (B, C), a fresh tensor: the kernel updates it in place
        if model.embed_positions is not None:
            x = x + model.embed_positions(positions[:, 0]).to(x.dtype)
        cos = sin = _NONE
        if model.rotary is not None:
            cos, sin = (t[:, 0].contiguous() for t in model.rotary(positions))  # (B, D) each
        logits = self._model_args.step(x.contiguous(), cache.k, cache.v, cache.length, cos, sin,
                                       _NONE if key_mask is None else key_mask)
        cache.advance(1)
        return logits


def _or_none(tensor: torch.Tensor | None) -> torch.Tensor:
    return _NONE if tensor is None else tensor
