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
