"""Pruning: masks equal to torch's pruning utilities and to Wanda's per-row rule, SparseGPT's reconstruction
better than masking alone, masks that survive training, the cubic schedule, structured pruning to a smaller
model equal to the masked original and loadable by transformers, and bad input refused clearly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from lmstack.compress import GradualPruning, masks_from_zeros, prune_, prune_structured, sparsity_report
from lmstack.compress.prune import magnitude_mask, nm_mask, parse_pattern, row_mask, sparsegpt_prune
from lmstack.compress.structured import _group_norms, block_influence
from lmstack.errors import ConfigError
from lmstack.models import DecoderConfig, build_model

TINY = DecoderConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
                     norm="rmsnorm", mlp="gated", activation="silu", position="rope", tie_embeddings=True)


def _model(config=TINY, seed=0):
    torch.manual_seed(seed)
    return build_model(config).eval()


def _calibration(seed=1, n=4, length=32, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


# --- masks against torch's pruning utilities (references) ----------------------------------------------

def test_magnitude_masks_equal_torch_l1_and_global_unstructured():
    torch.manual_seed(0)
    a, b = nn.Linear(32, 16), nn.Linear(48, 8)
    for amount in (0.3, 0.5, 0.9):
        ref = copy.deepcopy(a)
        torch_prune.l1_unstructured(ref, "weight", amount=amount)
        assert torch.equal(magnitude_mask(a.weight.detach().abs(), amount), ref.weight_mask.bool())
    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    torch_prune.global_unstructured([(ra, "weight"), (rb, "weight")], pruning_method=torch_prune.L1Unstructured,
                                    amount=0.5)
    model = nn.Sequential(copy.deepcopy(a), copy.deepcopy(b))
    prune_(model, "magnitude", 0.5, scope="global")
    assert torch.equal(model[0].weight != 0, ra.weight_mask.bool()) and torch.equal(model[1].weight != 0,
                                                                                    rb.weight_mask.bool())


def test_two_four_mask_equals_torch_ao_weight_norm_sparsifier():
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(64, 16))
    weight = ref[0].weight.detach().clone()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(ref, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    theirs = ref[0].parametrizations.weight[0].mask.bool()
    assert torch.equal(nm_mask(weight.abs(), 2, 4), theirs)
    model = nn.Sequential(nn.Linear(64, 16))
    model[0].weight.data.copy_(weight)
    prune_(model, "magnitude", pattern="2:4")
    assert torch.equal(model[0].weight != 0, theirs)
    groups = (model[0].weight != 0).reshape(16, 16, 4).sum(dim=2)
    assert torch.equal(groups, torch.full_like(groups, 2))


def test_structured_row_norms_choose_the_rows_of_torch_ln_structured():
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    ref = copy.deepcopy(lin)
    torch_prune.ln_structured(ref, "weight", amount=0.25, n=2, dim=0)
    kept_rows = ref.weight_mask.bool().all(dim=1)
    norms = _group_norms(lin.weight, 0, 1).sqrt()
    ours = torch.zeros(20, dtype=torch.bool)
    ours[torch.topk(norms, 20 - round(0.25 * 20)).indices] = True
    assert torch.equal(ours, kept_rows)


def test_wanda_prunes_each_row_by_weight_times_input_norm_as_the_paper():
    model = nn.Sequential(nn.Linear(32, 12))
    torch.manual_seed(3)
    xs = [torch.randn(2, 10, 32) * torch.linspace(0.1, 3.0, 32) for _ in range(3)]
    weight = model[0].weight.detach().clone()
    # The paper's code: W_metric = |W| * sqrt(scaler_row), scaler_row = mean of squared inputs per channel;
    # per output row, the int(in * s) smallest are pruned (stable sort).
    x = torch.cat([t.reshape(-1, 32) for t in xs])
    metric = weight.abs() * torch.sqrt((x ** 2).sum(dim=0) / x.shape[0])[None, :]
    expected = torch.ones_like(weight, dtype=torch.bool)
    expected.scatter_(1, torch.sort(metric, dim=-1, stable=True).indices[:, :16], False)
    prune_(model, "wanda", 0.5, calibration=xs)
    assert torch.equal(model[0].weight != 0, expected)
    assert ((model[0].weight == 0).sum(dim=1) == 16).all()  # exactly half of every row
    assert not torch.equal(expected, magnitude_mask(weight.abs(), 0.5))  # the input norms changed the choice


def test_torchao_wanda_sparsifier_ranks_the_whole_matrix_by_squared_norms_instead():
    """Documents why torchao is not our Wanda reference (REFERENCES.md): its mask is the whole matrix's bottom
    half of |W|·Σx², not the paper's per-row rule."""
    pytest.importorskip("torchao")
    from torchao.sparsity import WandaSparsifier

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 12))
    weight = model[0].weight.detach().clone()
    xs = [torch.randn(2, 10, 32) * torch.linspace(0.1, 3.0, 32) for _ in range(3)]
    sparsifier = WandaSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    for x in xs:
        model(x)
    sparsifier.step()
    theirs = model[0].parametrizations.weight[0].mask.bool()
    x = torch.cat([t.reshape(-1, 32) for t in xs])
    assert torch.equal(magnitude_mask(weight.abs() * (x ** 2).sum(dim=0), 0.5), theirs)
    assert not torch.equal(row_mask(weight.abs() * (x ** 2).sum(dim=0).sqrt(), 0.5), theirs)


def _layer_error(weight, pruned, x):
    return (x @ weight.T - x @ pruned.T).pow(2).mean().item()


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstruction_beats_masking_alone(pattern):
    torch.manual_seed(0)
    mix = torch.randn(64, 64) / 8 + torch.eye(64)
    x = torch.randn(512, 64) @ mix * torch.linspace(0.2, 2.0, 64)  # correlated, uneven input channels
    weight = torch.randn(32, 64)
    hessian = 2 * x.T.double() @ x.double() / x.shape[0]
    pruned = sparsegpt_prune(weight, hessian, 0.5, pattern)  # one block of 128 columns: its own threshold
    kept = pruned != 0
    if pattern is None:
        assert abs(kept.float().mean().item() - 0.5) < 0.02
    else:
        assert (kept.reshape(32, 16, 4).sum(dim=2) == 2).all()
    scores = weight.abs() * x.pow(2).sum(dim=0).sqrt()
    wanda = weight * (nm_mask(scores, *pattern) if pattern else row_mask(scores, 0.5))
    same_mask_no_update = weight * kept
    error = _layer_error(weight, pruned, x)
    assert error < _layer_error(weight, same_mask_no_update, x)  # the OBS update reconstructs
    assert error < _layer_error(weight, wanda, x)
    magnitude = nm_mask(weight.abs(), *pattern) if pattern else magnitude_mask(weight.abs(), 0.5)
    assert error < _layer_error(weight, weight * magnitude, x)


# --- the transform on a decoder ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_decoder_reaches_its_sparsity_and_leaves_embedding_and_head(method):
    model = _model()
    table = model.embed_tokens.weight.detach().clone()
    prune_(model, method, 0.5, calibration=_calibration())
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            assert abs((module.weight == 0).float().mean().item() - 0.5) < 0.02, name
    assert torch.equal(model.embed_tokens.weight, table)
    report = sparsity_report(model)
    assert "layers.0.attn.q_proj" in report and "all parameters" in report
    assert model.pruning["method"] == method


def test_masks_stay_through_training_and_others_learn():
    model = _model().train()
    prune_(model, "magnitude", 0.6)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for batch in _calibration(n=5):
        logits = model(batch)[:, :-1]
        F.cross_entropy(logits.reshape(-1, 96), batch[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in model.named_modules():
        if name in before:
            assert torch.all(module.weight[before[name] == 0] == 0), name  # exactly zero, not just small
            assert not torch.equal(module.weight, before[name])
    masks = masks_from_zeros(model)
    assert all(torch.equal(masks[n], before[n] != 0) for n in before)


def test_cubic_schedule_rises_to_the_final_sparsity_and_rebuilds_on_resume():
    model = _model()
    schedule = GradualPruning(model, 0.8, start=2, end=10, every=2)
    assert schedule.sparsity_at(1) == 0.0 and schedule.sparsity_at(10) == pytest.approx(0.8)
    assert schedule.sparsity_at(3) == schedule.sparsity_at(2)  # constant between pruning steps
    assert schedule.sparsity_at(4) == pytest.approx(0.8 * (1 - (1 - 2 / 8) ** 3))
    values = [schedule.sparsity_at(t) for t in range(2, 11, 2)]
    assert values == sorted(values) and values[1] - values[0] > values[-1] - values[-2]  # fast, then slow
    for step in range(0, 7):
        schedule(step)
    q = model.layers[0].attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(schedule.sparsity_at(6), abs=1e-3)
    resumed = GradualPruning(copy.deepcopy(model), 0.8, start=2, end=10, every=2)
    resumed(7)  # a run resumed between prunings reads the masks in force back from the zeros
    assert torch.equal(resumed.model.layers[0].attn.q_proj.weight_mask, model.layers[0].attn.q_proj.weight_mask)


def test_the_end_step_prunes_to_the_final_sparsity_off_the_grid():
    model = _model()
    schedule = GradualPruning(model, 0.5, start=0, end=5, every=2)  # pruning steps 0, 2, 4 and 5
    assert schedule.sparsity_at(4) < 0.5 and schedule.sparsity_at(5) == schedule.sparsity_at(9) == 0.5
    for step in range(0, 7):
        schedule(step)
    q = model.layers[0].attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


# --- structured pruning -----------------------------------------------------------------------------------

def _masked_equivalent(model, small_pruning, heads_kept, channels_kept, dropped=()):
    """The original model with the removed heads' o_proj columns and channels' down columns zeroed."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, block in enumerate(ref.layers):
            d = block.attn.head_dim
            keep_cols = torch.zeros(block.attn.n_heads * d, dtype=torch.bool)
            for h in heads_kept[i]:
                keep_cols[h * d:(h + 1) * d] = True
            block.attn.o_proj.weight[:, ~keep_cols] = 0
            keep = torch.zeros(block.mlp.down_proj.in_features, dtype=torch.bool)
            keep[channels_kept[i]] = True
            block.mlp.down_proj.weight[:, ~keep] = 0
    ref.layers = nn.ModuleList(b for i, b in enumerate(ref.layers) if i not in dropped)
    return ref


def test_structured_pruning_gives_a_smaller_model_equal_to_the_masked_original():
    model = _model()
    small = prune_structured(model, heads=0.5, channels=0.25)
    assert (small.config.n_heads, small.config.n_kv_heads, small.config.ffn_dim) == (2, 2, 96)
    assert small.config.head_dim == 16 and small.num_parameters() < model.num_parameters()
    # Which heads and channels survived: recompute the magnitude ranking per layer.
    heads_kept, channels_kept = [], []
    for block in model.layers:
        a, m = block.attn, block.mlp
        h = (_group_norms(a.q_proj.weight, 0, 16) + _group_norms(a.o_proj.weight, 1, 16)).view(2, 2)
        heads_kept.append([int(g * 2 + h[g].argmax()) for g in range(2)])  # the better head of each KV group
        c = _group_norms(m.gate_proj.weight, 0, 1) + _group_norms(m.up_proj.weight, 0, 1) + \
            _group_norms(m.down_proj.weight, 1, 1)
        channels_kept.append(torch.topk(c, 96).indices)
    ref = _masked_equivalent(model, small.pruning, heads_kept, channels_kept)
    ids = torch.randint(0, 96, (2, 20))
    torch.testing.assert_close(small(ids), ref(ids), atol=1e-5, rtol=1e-5)


def test_structured_pruning_of_layers_drops_the_least_influential_block():
    model = _model()
    calibration = _calibration()
    influence = block_influence(model, calibration)
    small = prune_structured(model, layers=1, calibration=calibration)
    assert small.config.n_layers == 2 and small.pruning["layers_removed"] == [int(influence.argmin())]
    ids = torch.randint(0, 96, (1, 16))
    ref = copy.deepcopy(model)
    ref.layers = nn.ModuleList(b for i, b in enumerate(ref.layers) if i != int(influence.argmin()))
    for i, block in enumerate(ref.layers):
        block.layer_idx = i
    torch.testing.assert_close(small(ids), ref(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("importance", ["activation", "gradient"])
def test_calibrated_importance_prunes_mha_whole_heads(importance):
    config = DecoderConfig(**{**TINY.__dict__, "n_kv_heads": 4, "head_dim": None})
    model = _model(config)
    small = prune_structured(model, heads=0.25, channels=0.5, importance=importance, calibration=_calibration())
    assert (small.config.n_heads, small.config.n_kv_heads, small.config.ffn_dim) == (3, 3, 64)
    assert small.layers[0].attn.k_proj.weight.shape == (48, 64)
    assert torch.isfinite(small(torch.randint(0, 96, (1, 8)))).all()


def test_structured_model_saves_and_transformers_loads_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmstack.checkpoints import save_hf

    small = prune_structured(_model(), heads=0.5, channels=0.5)
    save_hf(small, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.num_attention_heads == 2 and theirs.config.intermediate_size == 64
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, small(ids), atol=1e-4, rtol=1e-4)


# --- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, "in \\[0, 1\\)"), ({"sparsity": -0.1}, "in \\[0, 1\\)"),
    ({"pattern": "4:4"}, "less than M"), ({"pattern": "2-4"}, "N:M"), ({"pattern": "2:3"}, "divisible by 3"),
    ({"method": "wanda"}, "calibration"), ({"method": "wanda", "scope": "global", "calibration": [1]}, "global"),
    ({"method": "random"}, "unknown pruning method"),
])
def test_bad_pruning_settings_are_refused_before_anything_changes(kwargs, message):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        prune_(model, **{"method": "magnitude", **kwargs})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    ({"heads": 1.0}, "in \\[0, 1\\)"), ({"heads": 0.75}, "remove 2 of the 2 query heads in each KV group"),
    ({"heads": 0.1}, "removes no head"), ({"layers": 3}, "from 0 to 2"), ({"layers": 1}, "calibration"),
    ({"importance": "activation", "channels": 0.5}, "calibration"), ({"importance": "size"}, "unknown importance"),
])
def test_bad_structured_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        prune_structured(_model(), **kwargs)


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(None) is None
    with pytest.raises(ConfigError, match="less than M"):
        parse_pattern("5:4")


# --- pruned models decode through the fast path --------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [2, 4])
def test_structured_pruned_model_decodes_through_the_fused_step(kv_heads):
    from lmstack.kernels import load_cpu_kernels, use_skinny_linears_
    from lmstack.kernels.fused_step import FusedDecodeStep, fused_step_blocker
    from lmstack.nn.kv_cache import StaticKVCache

    if load_cpu_kernels() is None:
        pytest.skip("the CPU kernels cannot be built here")
    config = DecoderConfig(**{**TINY.__dict__, "n_kv_heads": kv_heads, "head_dim": None})
    small = prune_structured(_model(config), heads=0.5, channels=0.5)  # n_heads * head_dim != dim now
    reference = copy.deepcopy(small)
    fast = use_skinny_linears_(small, hugepages=False)
    assert fused_step_blocker(fast, 1) is None
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    caches = [StaticKVCache.for_model(reference, 1, 12) for _ in range(2)]
    step = FusedDecodeStep(fast)
    with torch.inference_mode():
        for model, cache in zip((reference, fast), caches):
            model(ids[:, :6], kv_cache=cache)
        for t in range(6, 12):
            positions = torch.full((1, 1), t)
            want = reference(ids[:, t:t + 1], position_ids=positions, kv_cache=caches[0])[:, -1]
            torch.testing.assert_close(step(ids[:, t], positions, caches[1], None), want, atol=1e-4, rtol=1e-4)
