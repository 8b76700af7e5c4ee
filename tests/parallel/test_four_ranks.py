"""2-D and deeper layouts on 4 gloo ranks (one torchrun launch for the module): FSDP x TP on a (dp 2, tp 2)
mesh, ZeRO-2 x TP, DDP and ZeRO-1 over 4 replicas, a 4-stage pipeline, and the whole composition (TP ->
activation checkpointing -> torch.compile -> FSDP); each trains like one process (the tolerance of
test_two_ranks.py). A ZeRO-3 checkpoint saved on 4 ranks resumes in one process.
"""

import json
import shutil

import pytest

from lmstack.train.trainer import read_metrics
from tests.parallel.common import train
from tests.parallel.conftest import check_launch, final_weights, launch, losses

CASES = {
    "fsdp_tp": "dp=2,tp=2,strategy=zero3", "zero2_tp": "dp=2,tp=2,strategy=zero2", "ddp4": "dp=4",
    "zero1_4": "dp=4,strategy=zero1", "pp4": "pp=4,dp=1,pp_schedule=1f1b,microbatches=4",
    # Inductor on CPU: about a minute of compiling on 2 cores, the one case that covers compile in a launch.
    "fsdp_tp_compiled": "dp=2,tp=2,strategy=zero3,activation_checkpointing=1,compile=1",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("four-ranks")
    check_launch(launch(4, out, [f"{name}:{spec}" for name, spec in CASES.items()]))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_layout_trains_like_one_process(runs, reference, name):
    expected, got = losses(reference[False]), losses(runs / name)
    assert len(got) == 20 and max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    ours, theirs = final_weights(runs / name), final_weights(reference[False])
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) < 1e-4


def test_the_parallel_plan_compiles_every_block_without_graph_breaks(runs):
    """``parallel.compile`` really compiled (graphs made and run through AOTAutograd), with no graph break that
    would leave part of a block eager: the case above equalled one eager process with compiled blocks."""
    counters = json.loads((runs / "fsdp_tp_compiled" / "dynamo.json").read_text())
    assert counters["stats"]["unique_graphs"] >= 1 and counters["aot_autograd"]["ok"] >= 1
    assert not counters.get("graph_break") and not counters.get("unimplemented")


def test_fsdp_tp_checkpoint_resumes_in_one_process(runs, reference, tmp_path):
    """Saved sharded over a (dp 2, tp 2) mesh at step 10, continued by a plain one-process Trainer."""
    run = tmp_path / "resumed"
    shutil.copytree(runs / "fsdp_tp", run)
    shutil.rmtree(run / "checkpoints" / "step-0000020")
    train(run, resume=True)
    got, expected = losses(run), losses(reference[False])
    assert len(got) == 20 and got[:10] == losses(runs / "fsdp_tp")[:10]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    assert abs(read_metrics(run / "metrics.jsonl")[-1]["eval_loss"]
               - read_metrics(reference[False] / "metrics.jsonl")[-1]["eval_loss"]) < 1e-5
