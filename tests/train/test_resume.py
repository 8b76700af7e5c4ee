"""A pretraining run killed with SIGKILL and resumed logs the same losses, bitwise, as one never interrupted."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.train.sigkill import kill_once_logged

ROOT = Path(__file__).resolve().parents[2]
STEPS = 120


def _command(out: Path, *extra: str) -> list[str]:
    # dropout > 0 so the resumed run also depends on the restored RNG state
    return [sys.executable, "-m", "lmstack.cli", "pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"),
            "--out", str(out), "--train.max_steps", str(STEPS), "--train.checkpoint_every", "10",
            "--train.eval_every", "25", "--model.dropout", "0.1", "--train.progress", "false", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in map(json.loads, lines)]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_command(reference), env=_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    steps_before = kill_once_logged(_command(killed), _env(), killed / "metrics.jsonl", 37)  # past step 30's checkpoint
    assert steps_before < STEPS

    resumed = subprocess.run(_command(killed, "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(killed) == _losses(reference)  # floats compared exactly
    assert [s for s, _, _ in _losses(killed)] == list(range(1, STEPS + 1))
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == [f"step-{s:07d}" for s in (110, 120)]  # keep_checkpoints: 2; no temporary leftovers
