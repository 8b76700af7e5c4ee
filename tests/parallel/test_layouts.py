"""Layout checks that need no processes: the world must factor, TP must divide heads and KV heads, a pipeline
needs at least one layer per stage, and families without a plan are refused by name."""

import pytest

from lmstack.errors import ConfigError
from lmstack.models import build_model
from lmstack.models.presets import get_preset
from lmstack.parallel.config import ParallelConfig
from lmstack.parallel.pipeline import stage_layers
from lmstack.parallel.plan import check_layout
from tests.parallel.common import model_config


def test_degrees_fill_the_world_with_data_parallel_ranks():
    assert ParallelConfig(tp=2).degrees(8) == (1, 4, 2)
    assert ParallelConfig(dp=2, tp=2).degrees(4) == (1, 2, 2)
    with pytest.raises(ConfigError, match="does not factor"):
        ParallelConfig(tp=3).degrees(4)
    with pytest.raises(ConfigError, match="does not factor"):
        ParallelConfig(dp=2, tp=2).degrees(8)


def test_bad_layouts_are_refused_naming_the_size():
    model = build_model(model_config(), seed=0)  # 4 heads, 2 KV heads, 4 layers
    with pytest.raises(ConfigError, match="n_kv_heads=2"):
        check_layout(model, ParallelConfig(tp=4), 4)
    with pytest.raises(ConfigError, match="model has 4 layers"):
        check_layout(model, ParallelConfig(pp=8), 8)
    with pytest.raises(ConfigError, match="zero2 or zero3"):
        check_layout(model, ParallelConfig(dp=2, tp=2), 4)
    with pytest.raises(ConfigError, match="runs alone"):
        check_layout(model, ParallelConfig(pp=2, dp=2), 4)
    with pytest.raises(ConfigError, match="ties them"):
        check_layout(build_model(model_config(tied=True), seed=0), ParallelConfig(pp=2), 2)
    with pytest.raises(ConfigError, match="no plan for mixtral"):
        check_layout(build_model(get_preset("tiny-mixtral"), seed=0), ParallelConfig(tp=2), 2)


def test_stages_split_layers_evenly_earlier_stages_take_the_rest():
    assert [list(r) for r in stage_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in stage_layers(8, 4)] == [2, 2, 2, 2]


def test_replicas_and_fsdp_fuse_the_head_into_the_loss_tensor_parallel_does_not():
    """The view a data-parallel strategy trains through has hidden_states and the head, so CausalLMObjective
    fuses them as in one process: the same loss and gradients, and no (tokens, V) logits kept for backward."""
    import torch

    from lmstack.parallel.data_parallel import HiddenStatesView, TrainingView
    from lmstack.parallel.plan import training_view
    from lmstack.train.objectives import CausalLMObjective

    model = build_model(model_config(), seed=0).train()
    assert type(training_view(model, model, fused_head=False)) is TrainingView  # tensor parallel: logits path
    view = training_view(model, model, fused_head=True)
    assert isinstance(view, HiddenStatesView) and view.lm_head is model.lm_head
    assert len(view.state_dict()) == len(model.state_dict())  # the head is not registered a second time
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    batch, vocab = (tokens[:, :-1], tokens[:, 1:]), model.config.vocab_size
    grads = []
    for runs_through in (view, TrainingView(model, model.config)):
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss, _ = CausalLMObjective()(runs_through, batch)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
        logits_kept = any(t.shape[-1] == vocab and t.numel() >= 16 * vocab and t.dtype.is_floating_point
                          and t is not model.lm_head.weight for t in saved)
        assert logits_kept == (runs_through is not view)
    (fused_loss, fused), (plain_loss, plain) = grads
    assert abs(fused_loss - plain_loss) < 1e-5
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
