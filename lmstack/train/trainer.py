"""The training loop: one loop for every objective (accumulation, clipping, schedule, evaluation,
checkpoints that resume bitwise, a JSONL metrics log and a progress bar).

    for step in range(max_steps):
        grad_accum x (batch -> objective(model, batch) -> backward)   _train_step
        clip -> optimizer.step -> scheduler.step
        every eval_every steps: objective.evaluate(held-out batches)  _evaluate
        metrics.jsonl += one JSON object for the step                 _log
        every checkpoint_every steps (and at the end): checkpoint     _save

The loop knows no objective. An objective owns its batch format, its loss, the numbers it logs and its
held-out evaluation (``Objective`` below); pretraining, fine-tuning, SFT, reward modelling, DPO and the
RL objectives all run through this one loop with the same checkpoints, resume, metrics and plots.

Resuming restores weights, optimizer and scheduler state, the data position and the RNG states, and
truncates metrics.jsonl to the checkpoint's step, so a run killed with SIGKILL and resumed produces the
same loss sequence as one never interrupted (bitwise on CPU; tested).

Distributed runs pass ``parallel`` (``lmstack.parallel.parallelize``'s result): it runs each micro-batch's
loss and backward (through DDP, FSDP2, tensor-parallel layers or a pipeline schedule), clips the global
gradient norm, averages the logged numbers over the data-parallel ranks and supplies the tensors of a
sharded checkpoint; rank 0 alone logs, shows progress and writes the files every rank shares.
"""

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import nn
from tqdm import tqdm

from lmstack.checkpoints.sharded import is_sharded, load_sharded_checkpoint, load_state_tensors, \
    save_sharded_checkpoint, state_tensors
from lmstack.checkpoints.train_state import latest_checkpoint, load_checkpoint, save_checkpoint
from lmstack.errors import CheckpointError, ConfigError, NumericalError
from lmstack.fileio import atomic_path, sweep_orphans
from lmstack.train.config import TrainConfig
from lmstack.train.optim import WarmupCosine, build_optimizer, param_groups



class Objective(Protocol):
    """What the Trainer runs: a loss over one batch, and a score over held-out batches.

    ``objective(model, batch) -> (loss, metrics)``: ``loss`` a scalar tensor to minimise; ``metrics`` a
    dict with ``"tokens"`` (items scored, for throughput) and any other numbers to log for the step
    (averaged over gradient-accumulation micro-batches: reward margins, accuracies, KL, ...).
    ``evaluate(model, batches) -> dict`` returns ``eval_*`` numbers; an objective without it has no
    held-out evaluation (the Trainer refuses held-out data for it).

    ``loss_items(batch) -> int`` (optional): how many items the batch's loss is the mean over (scored
    tokens, for a language model). With it, each micro-batch's loss is weighted by its share of the step's
    items, over gradient accumulation and data-parallel ranks together, so the gradient is that of the mean
    over every scored token of the step: SFT rows of unequal length give the same update whether they come in
    one batch, in accumulated micro-batches or on several ranks. Without it, micro-batches weigh equally.
    """

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]: ...


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA if available, else CPU; other names as given (errors name the key)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast where the hardware computes in it; None means fp32.

    CPUs without bf16 units run half-precision matmuls orders of magnitude slower, so "auto" never
    picks bf16 on a CPU and an explicit "bf16" there is an error."""
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ConfigError(f"train.precision='bf16' is not supported on {device} (use 'auto' or 'fp32')")
    return torch.bfloat16 if precision in ("bf16", "auto") and supported else None


def to_device(batch, device: torch.device):
    """A batch (tensor, tuple of tensors or dict of tensors) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return tuple(to_device(t, device) for t in batch)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class Trainer:
    """Trains ``model`` on ``train_data`` with ``objective`` under ``config``, writing into ``run_dir``.

    Args:
        model: an lmstack model (checkpoints are saved with ``save_hf``), already on its device.
        objective: an ``Objective``: the loss, the logged numbers and the held-out evaluation.
        train_data: anything with ``next_batch()``, ``state_dict()`` and ``load_state_dict()`` (packed
            blocks, collated batches, labelled examples, rollouts); its position is saved in checkpoints.
        eval_data: a callable returning a fresh iterable of held-out batches, or None.
        checkpoint_files: adds files (tokenizer, run config) to each checkpoint directory.
        step_callbacks: each called as ``callback(step)`` once before training (with the starting step: 0, or
            the resumed one) and after every optimizer step (before that step's evaluation and checkpoint):
            a technique that acts between steps (gradual pruning) without a loop of its own.
        parallel: a ``lmstack.parallel.Parallelized`` for a distributed run (``model`` is then its
            transformed model; ``train_data`` this rank's slice), or None for one process.
    """

    def __init__(self, model: nn.Module, objective: Objective, train_data, config: TrainConfig, run_dir: Path, *,
                 eval_data: Callable[[], Iterable] | None = None,
                 checkpoint_files: Callable[[Path], None] | None = None, parallel=None,
                 step_callbacks: Iterable[Callable[[int], None]] = ()) -> None:
        if eval_data is not None and not hasattr(objective, "evaluate"):
            raise ConfigError(f"{type(objective).__name__} has no held-out evaluation; pass no eval_data")
        if parallel is not None and config.compile:
            raise ConfigError("a distributed run compiles through its parallel plan: use --parallel.compile, "
                              "not --train.compile")
        self.model, self.objective, self.train_data, self.config = model, objective, train_data, config
        self.run_dir, self.eval_data = Path(run_dir), eval_data
        self.checkpoint_files, self.parallel = checkpoint_files, parallel
        self.step_callbacks = list(step_callbacks)
        self._trained = model if parallel is None else parallel.params_module  # whose parameters this rank holds
        self.is_main = parallel is None or parallel.is_main
        self.device = next(model.parameters()).device
        self.autocast = autocast_dtype(config.precision, self.device)
        if parallel is not None:  # DDP / FSDP / TP as the plan wrapped it
            self.train_model = parallel.module
        else:
            self.train_model = torch.compile(model) if config.compile else model
        betas = (config.beta1, config.beta2)
        if parallel is None:
            self.optimizer = build_optimizer(model, config.lr, config.weight_decay, betas)
        else:
            self.optimizer = parallel.make_optimizer(param_groups(parallel.params_module, config.weight_decay),
                                                     lr=config.lr, betas=betas, eps=1e-8)
        self.scheduler = WarmupCosine(self.optimizer, config.warmup_steps, config.max_steps, config.min_lr / config.lr)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.step, self.tokens_seen = 0, 0

    def fit(self, resume: bool = False) -> dict:
        """Train to ``max_steps`` (from the latest checkpoint with ``resume``); returns the last step's record."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            sweep_orphans(self.run_dir / "checkpoints")  # temporaries of a run killed mid-save
        if resume:
            self._resume()
        elif self.is_main:
            self.metrics_path.unlink(missing_ok=True)
        self.model.train()
        for callback in self.step_callbacks:
            callback(self.step)
        record = self._last_logged()  # what fit returns if the run is already complete
        bar = tqdm(total=self.config.max_steps, initial=self.step, desc="training", unit="step",
                   disable=not (self.config.progress and self.is_main), dynamic_ncols=True, mininterval=0.5)
        start = time.perf_counter()
        while self.step < self.config.max_steps:
            record = self._train_step()
            self.step += 1
            for callback in self.step_callbacks:
                callback(self.step)
            record = {"step": self.step, **record, "elapsed_s": round(time.perf_counter() - start, 3)}
            if self._due(self.config.eval_every) or self.step == self.config.max_steps:
                record.update(self._evaluate(final=self.step == self.config.max_steps))
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self._due(self.config.checkpoint_every) or self.step == self.config.max_steps:
                self._save()
        bar.close()
        return record

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _train_step(self) -> dict:
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens, logged = 0.0, 0, {}
        batches = [self.train_data.next_batch() for _ in range(self.config.grad_accum)]
        for batch, weight in zip(batches, self._loss_weights(batches)):
            batch = to_device(batch, self.device)
            with _autocast(self.device, self.autocast):
                value, metrics = self._forward_backward(batch, weight)
            total += value
            tokens += metrics["tokens"]
            for key, number in metrics.items():  # the objective's own numbers, averaged over micro-batches
                if key != "tokens":
                    logged[key] = logged.get(key, 0.0) + float(number) / self.config.grad_accum
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        if self.parallel is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        else:
            grad_norm = self.parallel.clip_grad_norm(clip)
            tokens, logged = self.parallel.reduce_metrics(tokens, logged)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.tokens_seen += tokens
        seconds = time.perf_counter() - started
        return {"loss": total, **logged, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.tokens_seen, "tokens_per_s": tokens / seconds}

    def _loss_weights(self, batches: list) -> list[float]:
        """Each micro-batch's weight in the step's loss: its share of the items scored over every micro-batch
        and data-parallel rank (times the ranks, whose gradients are averaged), or 1 / grad_accum each."""
        count = getattr(self.objective, "loss_items", None)
        if count is None:
            return [1.0 / len(batches)] * len(batches)
        items = [int(count(batch)) for batch in batches]
        total = sum(items) if self.parallel is None else self.parallel.sum_over_dp(sum(items))
        if total == 0:
            raise NumericalError(f"step {self.step + 1} has no scored items (every label of its batches is "
                                 "ignored): check the data's loss mask, e.g. SFT rows cut before the answer")
        ranks = 1 if self.parallel is None else self.parallel.dp
        return [n * ranks / total for n in items]

    def _forward_backward(self, batch, weight: float) -> tuple[float, dict]:
        """One micro-batch's backward of ``loss * weight`` (that value returned); stops before any update on a
        non-finite loss."""
        if self.parallel is not None:
            value, metrics = self.parallel.forward_backward(self.objective, batch, weight)
        else:
            loss, metrics = self.objective(self.train_model, batch)
            value = float(loss.detach()) * weight
        if not math.isfinite(value):  # stop before the update: the weights and the checkpoints stay good
            raise NumericalError(f"the training loss became {value} at step {self.step + 1}; the weights were "
                                 f"not updated, and the last checkpoint in {self.run_dir} is from before it "
                                 "(lower the learning rate or enable gradient clipping)")
        if self.parallel is None:
            (loss * weight).backward()
        return value, metrics

    def _evaluate(self, final: bool = False) -> dict:
        if self.eval_data is None:
            return {}
        batches = self.eval_data()
        if not final:  # periodic evaluations use the first eval_batches; the final one the whole split
            batches = (b for _, b in zip(range(self.config.eval_batches), batches))
        batches = (to_device(b, self.device) for b in batches)
        with _autocast(self.device, self.autocast):
            if self.parallel is not None:
                return self.parallel.evaluate(self.objective, batches)
            return self.objective.evaluate(self.train_model, batches)

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _rng_state(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def _save(self) -> Path:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                 "data": self.train_data.state_dict()}
        if self.parallel is not None:  # every rank writes its shards; nothing is gathered
            return save_sharded_checkpoint(self.run_dir, self.step, state_tensors(self._trained, self.optimizer),
                                           state, {"rng": self._rng_state()}, self.parallel.layout,
                                           keep=self.config.keep_checkpoints, extra_files=self.checkpoint_files)
        state.update(optimizer=self.optimizer.state_dict(), rng=self._rng_state())
        return save_checkpoint(self.run_dir, self.step, self.model, state, keep=self.config.keep_checkpoints,
                               extra_files=self.checkpoint_files)

    def _load(self, checkpoint: Path) -> tuple[dict, dict | None]:
        """Weights and optimizer state from ``checkpoint`` into the live run; (train state, RNG states or None)."""
        if is_sharded(checkpoint):  # a distributed run's (any layout; also into one process)
            tensors = state_tensors(self._trained, self.optimizer)
            state, own = load_sharded_checkpoint(checkpoint, tensors)
            load_state_tensors(self._trained, self.optimizer, tensors)
            return state, own and own["rng"]
        if self.parallel is not None:
            raise CheckpointError(f"{checkpoint} is a one-process checkpoint; a distributed run resumes from the "
                                  "sharded checkpoints distributed runs write (or start a new run)")
        state = load_checkpoint(checkpoint, self.model)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:  # weights that fit, an optimizer that does not (tied vs untied, ...)
            raise CheckpointError(f"checkpoint {checkpoint} holds the optimizer state of another model ({error}); "
                                  "start a new run without --resume") from None
        return state, state["rng"]

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.run_dir / 'checkpoints'}")
        state, rng = self._load(checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule's shape follows the current config (e.g. a raised train.max_steps), its position the checkpoint.
        self.scheduler.warmup_steps, self.scheduler.max_steps = self.config.warmup_steps, self.config.max_steps
        self.scheduler.min_ratio = self.config.min_lr / self.config.lr
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # a sharded checkpoint holds no hyper-parameters: the schedule's position sets it
        self.train_data.load_state_dict(state["data"])
        if rng is not None:  # None: this rank did not exist when it was saved (another world size) -> its seed
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if self.is_main:
            self._truncate_metrics()

    def _last_logged(self) -> dict:
        """The last step's record in metrics.jsonl, merged with the latest evaluation before it."""
        merged: dict = {}
        for record in read_metrics(self.metrics_path):
            merged.update(record)
        return merged

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint (the killed run's lost steps)."""
        kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= self.step]
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, oldest first ([] if there is none); a last line cut short by a kill
    is left out. Floats read back exactly as logged, so rewriting them changes nothing."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
