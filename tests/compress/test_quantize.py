"""Quantization: formats equal to the reference libraries, kernels equal to dequantise-then-matmul, the fused
decode step over quantized weights equal to the eager model, GPTQ / AWQ better than round-to-nearest,
files that round-trip, and bad input refused clearly."""

import copy
import json

import pytest
import torch
from torch import nn

from lmstack.compress import QuantizedLinear, formats, quantize_
from lmstack.compress.calibrated import awq_int4, gptq_int4
from lmstack.compress.files import dequantize_model, load_quantized, save_quantized
from lmstack.errors import CheckpointError, ConfigError
from lmstack.kernels import load_cpu_kernels, use_skinny_linears_
from lmstack.kernels.quant_matmul import quant_kernels
from lmstack.models import DecoderConfig, build_model

needs_kernels = pytest.mark.skipif(quant_kernels() is None, reason="the quantized CPU kernels cannot be built here")
SCHEMES = [("int8", None), ("int4", 32), ("int4", 128), ("nf4", None)]
TINY = DecoderConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                     norm="rmsnorm", mlp="gated", activation="silu", position="rope", tie_embeddings=True)


# --- formats against the reference libraries (test-only) ---------------------------------------------------

def test_int8_and_int4_codes_equal_torchao():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, PerGroup
    from torchao.quantization import quantize_ as torchao_quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64))
    weight = model[0].weight.detach().clone()
    torchao_quantize_(model, Int8WeightOnlyConfig())
    ours = formats.quantize_int8(weight)
    assert torch.equal(model[0].weight.qdata, ours["qweight"])
    assert torch.equal(model[0].weight.scale.flatten(), ours["scales"])

    model = nn.Sequential(nn.Linear(256, 64))
    weight = model[0].weight.detach().clone()
    torchao_quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerGroup(32),
                                                  mapping_type=MappingType.SYMMETRIC))
    ours = formats.quantize_int8(weight, 32)  # int8 with a scale per group of 32
    assert torch.equal(model[0].weight.qdata, ours["qweight"]) and torch.equal(model[0].weight.scale, ours["scales"])

    model = nn.Sequential(nn.Linear(256, 64))
    weight = model[0].weight.detach().clone()
    torchao_quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32),
                                                  mapping_type=MappingType.ASYMMETRIC))
    ours = formats.quantize_int4(weight, 32)
    theirs = model[0].weight
    codes = formats.unpack_nibbles(ours["qweight"], high_first=False).to(torch.int8) - 8
    assert torch.equal(theirs.qdata, codes)
    assert torch.equal(theirs.scale, ours["scales"]) and torch.equal(theirs.zero_point.to(torch.int8), ours["zeros"])
    assert torch.equal(theirs.dequantize(), formats.dequantize_int4(ours, 32))


def test_nf4_bytes_and_double_quantization_equal_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = formats.quantize_nf4(weight, double_quant=False)
    assert torch.equal(packed.flatten(), ours["qweight"].flatten()) and torch.equal(state.absmax, ours["absmax"])
    assert torch.equal(state.code, torch.tensor(formats.NF4_LEVELS))
    assert torch.equal(functional.dequantize_4bit(packed, state), formats.dequantize_nf4(ours))

    weight = torch.randn(512, 512)
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = formats.quantize_nf4(weight, double_quant=True)
    assert torch.equal(packed.flatten(), ours["qweight"].flatten())
    assert torch.equal(state.state2.code, formats.dynamic_map_signed())
    assert torch.equal(state.state2.absmax, ours["absmax_scales"]) and torch.equal(state.offset, ours["absmax_offset"])
    # bitsandbytes' CPU 8-bit search is not exact nearest: a few absmax codes are one step off (REFERENCES.md)
    steps = (state.absmax.int() - ours["absmax_codes"].int()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01


def test_int4_last_group_may_be_shorter():
    weight = torch.randn(8, 576)  # SmolLM2's width: 4 groups of 128 and one of 64
    tensors = formats.quantize_int4(weight, 128)
    assert tensors["scales"].shape == (8, 5)
    tail = formats.quantize_int4(weight[:, 512:], 64)
    assert torch.equal(formats.dequantize_int4(tensors, 128)[:, 512:], formats.dequantize_int4(tail, 64))


# --- kernels against the reference -------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("scheme, group", SCHEMES + [("int4", 64)])
def test_quantized_linear_equals_dequantise_then_matmul(scheme, group):
    torch.manual_seed(0)
    for n_out, n_in in ((37, 576), (5, 128)):
        layer = QuantizedLinear.from_linear(nn.Linear(n_in, n_out), scheme, group)
        for rows in (1, 2, 3, 5, 8, 9, 40):  # kernel rows, and the tiled path beyond 8
            x = torch.randn(rows, n_in)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("variant", ["int8 per group", "int4 with mins", "int4 zero 0"])
def test_gguf_shaped_layers_equal_dequantise_then_matmul(variant):
    """The layouts GGUF's Q8_0 / Q4_1 / Q4_0 load into (per-group int8 scales; float mins instead of zeros)."""
    g = torch.Generator().manual_seed(7)
    n_out, n_in = 37, 576
    scales = torch.rand(n_out, n_in // 32, generator=g) * 0.05 + 0.001
    if variant == "int8 per group":
        scheme, tensors = "int8", {"qweight": torch.randint(-128, 128, (n_out, n_in), generator=g, dtype=torch.int8),
                                   "scales": scales}
    else:
        codes = torch.randint(0, 16, (n_out, n_in), generator=g, dtype=torch.uint8)
        offsets = ({"mins": torch.randn(n_out, n_in // 32, generator=g) * 0.1} if variant == "int4 with mins"
                   else {"zeros": torch.zeros(n_out, n_in // 32, dtype=torch.int8)})
        scheme, tensors = "int4", {"qweight": formats.pack_nibbles(codes, high_first=False), "scales": scales, **offsets}
    layer = QuantizedLinear(n_in, n_out, scheme, tensors, torch.randn(n_out, generator=g), group_size=32)
    layer.check_tensors()
    for rows in (1, 3, 8, 9, 40):
        x = torch.randn(rows, n_in, generator=g)
        with torch.no_grad():
            want = layer.reference_forward(x)  # full-range random codes: outputs of order 1, so scale atol
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_kernels
def test_tiled_path_carries_gradients_to_inputs_and_bias():
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(64, 48), "nf4")
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    bias_grad = layer.bias.grad.clone()
    layer.bias.grad = None
    layer.reference_forward(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad) and torch.testing.assert_close(bias_grad, layer.bias.grad)


# --- the model transform -----------------------------------------------------------------------------------

def _tiny(seed: int = 0) -> nn.Module:
    model = build_model(TINY, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def _calibration() -> list[torch.Tensor]:
    return [torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_quantize_swaps_every_linear_and_unties_the_head():
    model = quantize_(_tiny(), "int8")
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.embed_tokens, nn.Embedding)
    assert model.config.tie_embeddings is False
    model.tie_weights()  # a later tie (as loading does) must not re-tie the quantized head
    assert isinstance(model.lm_head, QuantizedLinear) and not hasattr(model.lm_head, "weight")
    kept = quantize_(_tiny(), "int4", group_size=32, lm_head=False, exclude=("layers.1.*",))
    assert type(kept.lm_head) is nn.Linear and type(kept.layers[1].attn.q_proj) is nn.Linear
    assert isinstance(kept.layers[0].mlp.down_proj, QuantizedLinear) and kept.config.tie_embeddings


def _logit_errors(schemes) -> dict[str, float]:
    """Relative squared logit error of each scheme against fp32, on text unlike the calibration batches."""
    base = _tiny()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = base(ids)
        errors = {}
        for scheme in schemes:
            got = quantize_(copy.deepcopy(base), scheme, group_size=32, calibration=_calibration())(ids)
            errors[scheme] = ((got - want).square().mean() / want.square().mean()).item()
    return errors


def test_quantized_logits_stay_close_and_calibration_helps():
    errors = _logit_errors(["int8", "int4", "nf4", "gptq", "awq"])
    assert errors["int8"] < 2e-3 and errors["int4"] < 0.15 and errors["nf4"] < 0.2, errors
    assert errors["gptq"] < errors["int4"] and errors["awq"] < errors["int4"], errors


@pytest.mark.parametrize("call, message", [
    (lambda m: quantize_(m, "int3"), "unknown quantization scheme 'int3'"),
    (lambda m: quantize_(m, "int4", group_size=48), "group size must be 32, 64, 128 or 256"),
    (lambda m: quantize_(m, "gptq", group_size=32), "gptq needs calibration text"),
])
def test_bad_requests_are_refused_before_anything_is_swapped(call, message):
    model = _tiny()
    with pytest.raises(ConfigError, match=message):
        call(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules()) and model.config.tie_embeddings


def test_a_width_no_scheme_can_store_names_the_layer():
    model = build_model(DecoderConfig(vocab_size=96, dim=48, n_layers=1, n_heads=4, ffn_dim=96, max_seq_len=16))
    with pytest.raises(ConfigError, match=r"layers\.0\.attn\.q_proj: nf4 needs widths that are multiples of 64"):
        quantize_(model, "nf4")


# --- the fused decode step over quantized weights ------------------------------------------------------------

@needs_kernels
@pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernels cannot be built here")
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "awq", "gguf-q8_0", "gguf-q4_1"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_step_over_quantized_weights_equals_the_dequantised_model(scheme, rows, tmp_path):
    from lmstack.kernels.fused_step import fused_step_blocker

    if scheme.startswith("gguf"):  # GGUF blocks loaded as they are: grouped int8, int4 with float mins
        from lmstack.checkpoints.gguf_export import save_gguf
        from lmstack.compress.gguf_weights import load_gguf_quantized

        model = _tiny().float()
        model.config = model.config.replace(model_type="llama")
        quantized = load_gguf_quantized(save_gguf(model, tmp_path / "m.gguf", scheme[5:].upper()))
    else:
        quantized = quantize_(_tiny(), scheme, group_size=32, calibration=_calibration())
    quantized = use_skinny_linears_(quantized, hugepages=False)
    reference = dequantize_model(copy.deepcopy(quantized))  # plain fp32 linears holding the dequantised weights
    assert fused_step_blocker(quantized, rows) is None
    _compare_fused_steps(quantized, reference, rows, atol=1e-4)


def _compare_fused_steps(quantized, reference, rows: int, atol: float) -> None:
    """Six decoding steps of the fused step over ``quantized`` against ``reference`` run eagerly, after the
    same 6-token prompt."""
    from lmstack.kernels.fused_step import FusedDecodeStep
    from lmstack.nn.kv_cache import StaticKVCache

    ids = torch.randint(0, 96, (rows, 12), generator=torch.Generator().manual_seed(rows))
    caches = [StaticKVCache.for_model(reference, rows, 12) for _ in range(2)]
    step = FusedDecodeStep(quantized)
    with torch.inference_mode():
        for model, cache in zip((reference, quantized), caches):
            model(ids[:, :6], kv_cache=cache)
        for t in range(6, 12):
            positions = torch.full((rows, 1), t)
            want = reference(ids[:, t:t + 1], position_ids=positions, kv_cache=caches[0])[:, -1]
            got = step(ids[:, t], positions, caches[1], None)
            torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)


# --- calibrated methods --------------------------------------------------------------------------------------

def _layer_error(weight, tensors, x, group=32):
    scale = tensors.get("input_scale")
    dequant = formats.dequantize_int4(tensors, group)
    out = (x * scale if scale is not None else x) @ dequant.T
    return (out - x @ weight.T).square().mean().item()


def _correlated_inputs(rows=512, width=128):
    mixing = torch.randn(width, width, generator=torch.Generator().manual_seed(1)) * 0.3 + torch.eye(width)
    scales = torch.linspace(0.2, 4.0, width)
    return (torch.randn(rows, width, generator=torch.Generator().manual_seed(2)) @ mixing) * scales


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(act_order):
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs()
    gptq = gptq_int4(weight, 2 * x.T @ x / x.shape[0], 32, act_order=act_order)
    rtn = formats.quantize_int4(weight, 32)
    assert torch.equal(gptq["scales"], rtn["scales"])  # static groups: the same layout as round-to-nearest
    assert _layer_error(weight, gptq, x) < 0.8 * _layer_error(weight, rtn, x)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal Hessian no error can be compensated in other columns: GPTQ must pick RTN's codes."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    hessian = torch.diag(torch.linspace(0.5, 2.0, 64)).double()
    assert torch.equal(gptq_int4(weight, hessian, 32, act_order=False)["qweight"],
                       formats.quantize_int4(weight, 32)["qweight"])


def test_awq_scales_salient_channels_and_beats_round_to_nearest():
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(6))
    x[:, :4] *= 30  # a few salient channels, as in real activations
    awq = awq_int4(weight, x, x.abs().mean(dim=0), 32)
    rtn = formats.quantize_int4(weight, 32)
    assert _layer_error(weight, awq, x) < 0.9 * _layer_error(weight, rtn, x)
    assert awq["input_scale"][:4].max() < awq["input_scale"][4:].min()  # salient inputs divided by larger s


# --- files ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "awq"])
def test_saved_quantized_models_load_back_identically(scheme, tmp_path):
    model = quantize_(_tiny(), scheme, group_size=32, calibration=_calibration())
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lmstack"
    assert config["quantization_config"]["scheme"] == scheme and config["tie_word_embeddings"] is False
    loaded = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_damaged_quantized_checkpoints_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    from lmstack.checkpoints import load_hf

    directory = save_quantized(quantize_(_tiny(), "int4", group_size=32), tmp_path / "q")
    with pytest.raises(CheckpointError, match="holds a quantized model .int4.: load it with"):
        load_hf(directory)
    tensors = load_file(directory / "model.safetensors")
    good, pristine = dict(tensors), dict(tensors)
    tensors["layers.0.attn.q_proj.scales"] = tensors["layers.0.attn.q_proj.scales"][:, :1].contiguous()
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.q_proj: int4 tensor 'scales' is torch.float32 "
                                              r"\[64, 1\], expected torch.float32 \[64, 2\]"):
        load_quantized(directory)
    del good["layers.1.mlp.up_proj.zeros"]
    save_file(good, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="int4 tensor 'zeros' is missing"):
        load_quantized(directory)
    save_file(pristine, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["modules"]["layers.9.attn.q_proj"] = {"scheme": "int4", "group_size": 32}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not exist in this model"):
        load_quantized(directory)


def test_a_half_precision_model_takes_the_reference_path_not_misread_scales():
    layer = QuantizedLinear.from_linear(nn.Linear(64, 16), "int4", 32)
    x = torch.randn(2, 64)
    with torch.no_grad():
        want = layer(x)
        layer.half()  # scales become fp16: the kernels must not read them as fp32
        assert layer.scales.dtype is torch.float16
        torch.testing.assert_close(layer(x.half()).float(), want, rtol=1e-2, atol=1e-2)


@needs_kernels
@pytest.mark.parametrize("scheme, group", SCHEMES + [("int8", 32)])
def test_compiled_tile_dequantisation_equals_the_reference_bit_for_bit(scheme, group):
    from lmstack.kernels import quant_matmul as kernels

    layer = QuantizedLinear.from_linear(nn.Linear(576, 70), scheme, group)
    if scheme == "int4":
        tile = kernels.int4_dequant(layer.qweight, layer.scales, layer.zeros, None, 10, 50, group)
    elif scheme == "nf4":
        tile = kernels.nf4_dequant(layer.qweight, layer.levels, formats.nf4_absmax(layer.tensors()), 10, 50)
    else:
        tile = kernels.int8_dequant(layer.qweight, layer.scales, 10, 50, group or 0)
    assert torch.equal(tile, layer.dequantize()[10:50])


@pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernels cannot be built here")
def test_the_fused_step_refuses_scales_that_are_not_fp32():
    from lmstack.kernels.fused_step import fused_step_blocker

    model = use_skinny_linears_(quantize_(_tiny(), "int4", group_size=32), hugepages=False)
    assert fused_step_blocker(model, 1) is None
    model.layers[0].attn.q_proj.scales = model.layers[0].attn.q_proj.scales.half()
    assert fused_step_blocker(model, 1) == "buffers (e.g. quantization scales) are not all fp32 on CPU"


# --- dynamic quantization: int8 activations ------------------------------------------------------------------

def test_dynamic_int8_equals_torchao():
    """quantize_(..., "int8", activations="int8") is torchao's Int8DynamicActivationInt8WeightConfig: per-token
    int8 activations times per-row int8 weights, integer products, then both scales."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization import quantize_ as torchao_quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64))
    ours = QuantizedLinear.from_linear(model[0], "int8", activations="int8")
    torchao_quantize_(model, Int8DynamicActivationInt8WeightConfig())
    assert torch.equal(model[0].weight.qdata, ours.qweight)
    x = torch.randn(40, 256) * torch.linspace(0.1, 5.0, 256)  # unequal channels, as real activations
    x[3, 7] = -x[3].abs().max() * 2  # a token whose absmax is negative: code -128
    codes, scales = formats.quantize_activations(x)
    assert codes[3, 7] == -128 and scales.shape == (40, 1)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(ours.reference_forward(x), want, rtol=1e-5, atol=1e-5)
        if quant_kernels() is not None:
            for rows in (1, 3, 8):  # the integer kernels: exact products, so equal to the last bits
                torch.testing.assert_close(ours(x[:rows]), want[:rows], rtol=1e-6, atol=1e-6)


def test_activation_blocks_follow_the_weight_groups():
    x = torch.randn(3, 96)
    codes, scales = formats.quantize_activations(x, 64)  # blocks of 64 and 32 (the last is shorter)
    assert codes.shape == (3, 96) and scales.shape == (3, 2)
    assert torch.equal(scales[:, 1], (x[:, 64:].abs().amax(dim=1) / 127))  # llama.cpp's Q8_0 rule per group
    assert torch.equal(formats.quantize_activations(x)[1][:, 0], x.abs().amax(dim=1) / 127.5)  # torchao's per token
    assert torch.equal(formats.fake_quantize_activations(x, 64)[:, 64:], formats.fake_quantize_activations(x[:, 64:], 32))
    assert codes.abs().max() <= 127
    assert (formats.fake_quantize_activations(x, 64) - x).abs().max() <= scales.max() / 2 * 1.0001  # half a step


@needs_kernels
@pytest.mark.parametrize("scheme, group", [("int8", None), ("int8", 32), ("int8", 128), ("int4", 32), ("int4", 64),
                                           ("int4", 128), ("int4", 256)])
def test_dynamic_kernels_equal_quantise_both_then_matmul(scheme, group):
    torch.manual_seed(0)
    # 576: a shorter last group for 128 and 256; 37, 5, 39 and 2 rows: every remainder of the kernels' 4 weight rows
    for n_out, n_in in ((37, 576), (5, 1024), (39, 64), (2, 256)):
        layer = QuantizedLinear.from_linear(nn.Linear(n_in, n_out), scheme, group, activations="int8")
        for rows in (1, 2, 3, 5, 8, 9, 40):
            x = torch.randn(rows, n_in)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


def _has_prompt_gemm() -> bool:
    from lmstack.kernels.isa import kernel_isa

    return quant_kernels() is not None and kernel_isa() == "avx512-vnni"


@pytest.mark.skipif(not _has_prompt_gemm(), reason="the integer prompt GEMM needs an AVX-512 VNNI build")
@pytest.mark.parametrize("scheme, group, offsets", [("int8", None, None), ("int8", 32, None), ("int8", 128, None),
                                                    ("int4", 32, "zeros"), ("int4", 128, "zeros"), ("int4", 256, "zeros"),
                                                    ("int4", 32, "mins"), ("int4", 64, "mins")])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_prompt_gemm_equals_quantise_both_then_matmul(scheme, group, offsets, threads):
    """csrc/dynamic_gemm.h: any number of rows (tiles of 6, chunks of 96), widths that are not whole panels of 32
    (masked stores), shorter last groups, with and without bias, over 1 and 2 threads."""
    from lmstack.kernels.quant_matmul import dynamic_gemm

    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_out, n_in, bias in ((70, 576, True), (16, 64 if group in (None, 32) else 256, False), (33, 1024, True)):
            layer = QuantizedLinear.from_linear(nn.Linear(n_in, n_out, bias=bias), scheme, group, activations="int8")
            if offsets == "mins":  # Q4_1's float offsets instead of integer zero points
                tensors = layer.tensors()
                tensors["mins"] = torch.randn_like(tensors.pop("zeros"), dtype=torch.float32) * 0.02
                layer = QuantizedLinear(n_in, n_out, scheme, tensors, layer.bias, group, "int8")
            for rows in (9, 13, 96, 203):
                x = torch.randn(rows, n_in) * torch.linspace(0.1, 4.0, n_in)
                with torch.no_grad():
                    want = layer.reference_forward(x)
                    got = dynamic_gemm(x, layer.qweight, layer.scales, layer._buffers.get("zeros"),
                                       layer._buffers.get("mins"), layer.bias, group or 0)
                    assert got is not None, "a VNNI build multiplies prompts in integers"
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)  # the module takes the GEMM
    finally:
        torch.set_num_threads(previous)


@needs_kernels
def test_prompts_too_wide_for_the_gemm_take_the_tiles():
    """Per-token int8 over more than 65536 inputs could overflow a lane with w + 128: the GEMM declines and the
    module multiplies over dequantised tiles, with the same result."""
    from lmstack.kernels.quant_matmul import dynamic_gemm

    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(65536 + 32, 2), "int8", activations="int8")
    x = torch.randn(10, layer.in_features)
    with torch.no_grad():
        assert dynamic_gemm(x, layer.qweight, layer.scales, None, None, layer.bias, 0) is None
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("variant", ["int8 per group", "int4 with mins", "int4 zero 0"])
def test_dynamic_kernels_on_gguf_layouts(variant, tmp_path):
    """Q8_0 / Q4_1 / Q4_0 kept as they are, with int8 activations per block of 32 (llama.cpp's arithmetic)."""
    from lmstack.checkpoints.gguf_export import save_gguf
    from lmstack.compress.gguf_weights import load_gguf_quantized

    model = _tiny().float()
    model.config = model.config.replace(model_type="llama")
    kind = {"int8 per group": "Q8_0", "int4 with mins": "Q4_1", "int4 zero 0": "Q4_0"}[variant]
    loaded = load_gguf_quantized(save_gguf(model, tmp_path / "m.gguf", kind), activations="int8")
    layer = loaded.layers[0].mlp.down_proj
    assert layer.activations == "int8" and layer.group_size == 32
    for rows in (1, 4, 8, 40):  # decoding's kernels, then a prompt's
        x = torch.randn(rows, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


def _forced_reference(model: nn.Module) -> nn.Module:
    """A copy whose quantized layers all run reference_forward (the readable definition)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.forward = module.reference_forward
    return model


@needs_kernels
@pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernels cannot be built here")
@pytest.mark.parametrize("scheme, group", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_step_with_int8_activations_equals_the_reference_model(scheme, group, rows):
    from lmstack.kernels.fused_step import FusedDecodeStep, fused_step_blocker
    from lmstack.kernels.skinny_linear import INT4_DYNAMIC, INT8_DYNAMIC

    quantized = use_skinny_linears_(quantize_(_tiny(), scheme, group_size=group, activations="int8"), hugepages=False)
    reference = _forced_reference(quantized)
    assert fused_step_blocker(quantized, rows) is None
    assert set(FusedDecodeStep(quantized).formats[0::2]) == {INT8_DYNAMIC if scheme == "int8" else INT4_DYNAMIC}
    # Per token, torchao's rule puts a token's largest negative element on the rounding boundary -127.5, where
    # the last bit of x (torch's norms against the fused step's) picks -127 or -128: one code step, which
    # moves these logits (std 1) by up to ~1e-1 in this 64-wide model. Per group (llama.cpp's rule) no element
    # sits on a boundary by construction, but one can land within the last bit of x of one by chance: on some
    # hosts (1 row, int8, group 32) one code flips and the logits move by ~2e-2. A wrong kernel is off by O(1).
    _compare_fused_steps(quantized, reference, rows, atol=2e-1 if group is None else 5e-2)


def test_int8_activations_are_saved_and_loaded(tmp_path):
    model = quantize_(_tiny(), "int4", group_size=32, activations="int8")
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["activations"] == "int8"
    assert config["modules"]["layers.0.attn.q_proj"] == {"scheme": "int4", "group_size": 32, "activations": "int8"}
    loaded = load_quantized(tmp_path / "q")
    assert all(m.activations == "int8" for m in loaded.modules() if isinstance(m, QuantizedLinear))
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["modules"]["layers.0.attn.q_proj"]["activations"] = "fp8"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.q_proj: unknown activation quantization 'fp8'"):
        load_quantized(tmp_path / "q")


@pytest.mark.parametrize("scheme, activations, message", [
    ("nf4", "int8", "nf4 keeps fp32 activations"),
    ("int8", "int4", "unknown activation quantization 'int4'"),
])
def test_bad_activation_requests_are_refused(scheme, activations, message):
    model = _tiny()
    with pytest.raises(ConfigError, match=message):
        quantize_(model, scheme, activations=activations)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


# --- the token embedding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 32), ("nf4", None)])
def test_quantized_embedding_lookup_equals_the_dequantised_table(scheme, group):
    from lmstack.compress import QuantizedEmbedding

    table = nn.Embedding(96, 128)
    embedding = QuantizedEmbedding.from_embedding(table, scheme, group)
    ids = torch.tensor([[0, 5, 95], [7, 7, 1]])
    assert torch.equal(embedding(ids), embedding.dequantize()[ids])
    # the same codes a linear of shape (vocab, dim) gets: the tied head's table
    assert torch.equal(embedding.dequantize(), QuantizedLinear.from_linear(_linear(table), scheme, group).dequantize())
    with pytest.raises(IndexError, match=r"token ids must be in \[0, 96\), got 0..96"):
        embedding(torch.tensor([0, 96]))


def _linear(table: nn.Embedding) -> nn.Linear:
    linear = nn.Linear(table.embedding_dim, table.num_embeddings, bias=False)
    linear.weight = table.weight
    return linear


@pytest.mark.parametrize("scheme", ["int8", "int4", "awq"])
def test_a_tied_head_and_the_embedding_share_one_quantized_table(scheme, tmp_path):
    from lmstack.compress import QuantizedEmbedding

    base = _tiny()
    model = quantize_(copy.deepcopy(base), scheme, group_size=32, calibration=_calibration(), embedding=True)
    assert isinstance(model.embed_tokens, QuantizedEmbedding) and isinstance(model.lm_head, QuantizedLinear)
    assert model.embed_tokens.qweight.data_ptr() == model.lm_head.qweight.data_ptr()  # one table, as in llama.cpp
    reference = dequantize_model(copy.deepcopy(model))
    assert reference.config.tie_embeddings and reference.lm_head.weight is reference.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)
        assert ((model(ids) - base(ids)).square().mean() / base(ids).square().mean()) < 0.2
    save_quantized(model, tmp_path / "q")
    entries = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    assert entries["embed_tokens"] == {"scheme": "int8" if scheme == "int8" else "int4", "group_size": 32,
                                       "embedding": True}
    assert entries["lm_head"]["shares"] == "embed_tokens"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert "embed_tokens.qweight" in f.keys() and not [k for k in f.keys() if k.startswith("lm_head.")]
    loaded = load_quantized(tmp_path / "q")
    assert loaded.embed_tokens.qweight.data_ptr() == loaded.lm_head.qweight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_an_untied_or_fp32_head_keeps_its_own_weight_when_the_embedding_is_quantized():
    from lmstack.compress import QuantizedEmbedding

    model = quantize_(_tiny(), "int4", group_size=32, lm_head=False, embedding=True)
    assert isinstance(model.embed_tokens, QuantizedEmbedding) and type(model.lm_head) is nn.Linear
    assert not model.config.tie_embeddings
    model.tie_weights()  # nothing re-ties the fp32 head to the quantized table
    assert type(model.lm_head.weight) is nn.Parameter
    untied = build_model(TINY.replace(tie_embeddings=False), seed=1)
    untied = quantize_(untied, "int8", embedding=True)
    assert untied.embed_tokens.qweight.data_ptr() != untied.lm_head.qweight.data_ptr()


def test_damaged_shared_table_records_are_clear_errors(tmp_path):
    directory = save_quantized(quantize_(_tiny(), "int4", group_size=32, embedding=True), tmp_path / "q")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["modules"]["lm_head"]["shares"] = "layers.0.attn.q_proj"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lm_head: shares 'layers.0.attn.q_proj', which is not a quantized embedding"):
        load_quantized(directory)


@needs_kernels
def test_gguf_files_keep_their_embedding_quantized_and_shared(tmp_path):
    from lmstack.checkpoints.gguf import load_gguf
    from lmstack.checkpoints.gguf_export import save_gguf
    from lmstack.compress import QuantizedEmbedding
    from lmstack.compress.gguf_weights import load_gguf_quantized

    model = _tiny().float()
    model.config = model.config.replace(model_type="llama")
    path = save_gguf(model, tmp_path / "m.gguf", "Q4_0")
    kept, plain = load_gguf_quantized(path), load_gguf(path)
    assert isinstance(kept.embed_tokens, QuantizedEmbedding)
    assert kept.embed_tokens.qweight.data_ptr() == kept.lm_head.qweight.data_ptr()
    assert torch.equal(kept.embed_tokens.dequantize(), plain.embed_tokens.weight)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), plain(ids), rtol=1e-5, atol=1e-5)
    assert type(load_gguf_quantized(path, embedding=False).embed_tokens) is nn.Embedding


def test_quantized_codes_move_into_huge_pages_and_stay_shared():
    from lmstack.nn.memory import hugepages_available, in_hugepages, move_buffers_to_hugepages_

    if not hugepages_available():
        pytest.skip("no MADV_HUGEPAGE on this platform")
    model = quantize_(_tiny(), "int4", group_size=32, embedding=True)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        want = model(ids)
        move_buffers_to_hugepages_(model, min_bytes=0)  # use_skinny_linears_ does this for buffers >= 64 KiB
        assert in_hugepages(model.layers[0].mlp.down_proj.qweight) and in_hugepages(model.lm_head.scales)
        assert model.embed_tokens.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
        assert torch.equal(model(ids), want)


@needs_kernels
@pytest.mark.parametrize("block", [None, 32, 128])
def test_compiled_activation_rounding_equals_the_reference_bit_for_bit(block):
    from lmstack.kernels import quant_matmul as kernels

    x = torch.randn(40, 576) * torch.linspace(0.1, 8.0, 576)
    x[3, 7] = -50.0  # a negative absmax: -127.5 exactly, which rounds (half to even) to -128
    assert torch.equal(kernels.fake_quantize_activations(x, block), formats.fake_quantize_activations(x, block))
