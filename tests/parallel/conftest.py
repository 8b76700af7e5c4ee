"""One ``torchrun`` launch per test module (module-scoped fixtures), and the one-process reference runs."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.checkpoints.sharded import load_sharded_weights
from lmstack.checkpoints.train_state import latest_checkpoint, load_checkpoint
from lmstack.models import build_model
from lmstack.train.trainer import read_metrics
from tests.parallel.common import model_config, train

WORKER = Path(__file__).with_name("worker.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


def launch(n: int, out: Path, cases: list[str], timeout_s: float = 60, limit_s: float = 600):
    """``torchrun --nproc-per-node n worker.py out timeout_s cases...``; returns the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(WORKER), str(out), str(timeout_s), *cases]
    return subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=limit_s)


def check_launch(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def final_weights(run: Path, tied: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a run's latest checkpoint, sharded (any layout) or not, in a plain model."""
    model = build_model(model_config(tied), seed=0)
    checkpoint = latest_checkpoint(run)
    if (checkpoint / "sharded").is_dir():
        load_sharded_weights(checkpoint, model)
    else:
        load_checkpoint(checkpoint, model)
    return model.state_dict()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One-process runs of the same training (untied and tied embeddings): run directories by ``tied``."""
    runs = {}
    for tied in (False, True):
        run = tmp_path_factory.mktemp(f"reference-{int(tied)}")
        train(run, tied=tied)
        runs[tied] = run
    return runs


def spawn(n: int, out: Path, cases: list[str], timeout_s: float = 60, limit_s: float = 300) -> list:
    """The ranks of a launch as plain processes (no torchrun agent to stop the others when one dies), so a test
    sees what each surviving rank does by itself. Returns (returncode, stderr, seconds) per rank."""
    import time

    port, started = free_port(), time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), str(timeout_s), *cases], text=True,
                              env={**worker_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(n)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=limit_s)
        results.append((p.returncode, err, time.perf_counter() - started))
    return results
