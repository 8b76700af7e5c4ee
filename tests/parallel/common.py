"""The run every distributed test repeats: a tiny Llama trained 20 steps through the Trainer on fixed token
rows, in one process (the reference) or under ``torchrun`` with a parallel layout (``worker.py``)."""

import dataclasses
import os
import signal
from pathlib import Path

import torch

from lmstack.models import build_model
from lmstack.models.presets import get_preset
from lmstack.train import Trainer
from lmstack.train.config import TrainConfig
from lmstack.train.objectives import CausalLMObjective

BATCH, SEQ, VOCAB = 8, 16, 96


def model_config(tied: bool = False):
    return dataclasses.replace(get_preset("tiny-llama"), vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4,
                               n_kv_heads=2, ffn_dim=64, max_seq_len=32, tie_embeddings=tied)


def rows(n: int, seed: int) -> torch.Tensor:
    """(n, SEQ + 1) token rows with structure to learn (a noisy walk: next = prev + 1..3 mod VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, SEQ), generator=g)
    return torch.cat([start, steps], 1).cumsum(1) % VOCAB


class Rows:
    """Batches of BATCH rows from a fixed pool, in order; its position is its state. ``kill_at``: SIGKILL
    this process when batch number ``kill_at`` is asked for (a rank dying mid-run)."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.pool, self.i, self.kill_at = rows(64, 0), 0, kill_at

    def next_batch(self):
        if self.kill_at is not None and self.i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        start = (self.i * BATCH) % len(self.pool)
        self.i += 1
        w = self.pool[start:start + BATCH]
        return w[:, :-1], w[:, 1:]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


def held_out():
    w = rows(16, 1)
    return [(w[:8, :-1], w[:8, 1:]), (w[8:, :-1], w[8:, 1:])]


def train_config(steps: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=BATCH, lr=3e-3, min_lr=3e-4, warmup_steps=2, grad_clip=0.5,
                       eval_every=0, checkpoint_every=10, keep_checkpoints=5, progress=False, device="cpu")


def train(run_dir: Path, *, tied: bool = False, steps: int = 20, parallel=None, world=None, resume: bool = False,
          kill_at: int | None = None) -> dict:
    """Train and return the last metrics record; a parallel run also needs the ``world`` it joined."""
    model = build_model(model_config(tied), seed=0).train()
    data, plan = Rows(kill_at), None
    if parallel is not None:
        from lmstack.parallel import parallelize
        plan = parallelize(model, parallel, world, seed=0)
        data = plan.shard_data(data)
    trainer = Trainer(model, CausalLMObjective(), data, train_config(steps), run_dir, eval_data=held_out,
                      parallel=plan)
    return trainer.fit(resume=resume)
