"""Faults and bad layouts across processes: a rank killed mid-run makes the others stop with a clear message
(no hang), and the run resumes from its last checkpoint at another world size and layout (ZeRO-3 on 4
ranks -> DDP on 2) training like one process; a layout the model cannot take stops every rank with the
same message. Three launches: the killed one, the resumed one, the refused one."""

import shutil

import pytest
import torch

from lmstack.checkpoints.sharded import load_sharded_checkpoint
from lmstack.checkpoints.train_state import latest_checkpoint
from lmstack.errors import CheckpointError

from tests.parallel.common import train
from tests.parallel.conftest import check_launch, launch, losses, spawn


def test_killed_rank_stops_the_others_and_the_run_resumes_elsewhere(tmp_path, reference):
    results = spawn(4, tmp_path, ["run:dp=4,strategy=zero3,kill_at=13@2"], timeout_s=30)
    codes = [code for code, _, _ in results]
    assert codes[2] == -9  # SIGKILLed while asking for batch 13 (step 14; the last checkpoint is step 10)
    for rank in (0, 1, 3):
        code, err, seconds = results[rank]
        assert code == 1 and "another rank stopped, crashed or did not answer" in err, err[-2000:]
        assert "Traceback" not in err and seconds < 120
    assert [c.name for c in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000010"]

    check_launch(launch(2, tmp_path, ["run:dp=2,strategy=ddp,resume=1"]))
    got, expected = losses(tmp_path / "run"), losses(reference[False])
    assert len(got) == 20 and max(abs(a - b) for a, b in zip(got, expected)) < 1e-5

    # A sharded checkpoint read into another model (other sizes) is refused, naming it, before any collective.
    with pytest.raises(CheckpointError, match="holds another model"):
        load_sharded_checkpoint(latest_checkpoint(tmp_path / "run"), {"model.embed_tokens.weight": torch.zeros(3, 3)})


def test_a_bad_layout_stops_every_rank_with_the_same_message(tmp_path):
    results = spawn(2, tmp_path, ["bad:tp=2,pp=2"])  # 2 ranks cannot be pp 2 x tp 2
    for code, err, _ in results:
        assert code == 1 and "does not factor into parallel.pp=2" in err and "Traceback" not in err, err[-2000:]


def test_resuming_another_models_plain_checkpoint_is_refused(tmp_path, reference):
    run = tmp_path / "other"
    shutil.copytree(reference[False], run)
    with pytest.raises(CheckpointError, match="another model"):
        train(run, tied=True, resume=True)
