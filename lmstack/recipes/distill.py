"""`lmstack distill`: train a student decoder to imitate a teacher, then export it.

    lmstack distill --teacher runs/quickstart/model --student.layers 2 --data.train shakespeare.txt \\
        --distill.loss kd --distill.temperature 2 --out runs/qs-student
    lmstack distill --teacher runs/big --student.path runs/small --distill.loss jsd --distill.mode on_policy ...

The student is a checkpoint (``student.path``) or cut from the teacher: ``student.layers`` of its blocks,
evenly spaced or (``student.pick influence``) those that change their input most on the first training blocks,
with its embeddings, norm and head (``lmstack.compress.keep_layers``), from the teacher's
weights or fresh (``student.init random``: the same shape trained from the teacher alone). Teacher and student
must share the tokenizer. Text is packed into blocks as ``lmstack finetune --task causal_lm`` does; the loss is
``lmstack.compress.distill.DistillObjective`` on the one training loop (checkpoints, resume, metrics, loss
plot); held-out numbers are the student's own loss and bits per byte. At the end ``model/`` holds the student
as a Hugging Face checkpoint with the tokenizer (the feature projections, a training-only part, left out).
"""

from pathlib import Path

import numpy as np
import torch

from lmstack.checkpoints import load_model, save_hf
from lmstack.checkpoints.model_files import open_model
from lmstack.compress import keep_layers
from lmstack.compress.distill import DistillObjective, check_same_vocabulary
from lmstack.compress.structured import block_influence
from lmstack.config import save_yaml
from lmstack.data import PackedBlocks, eval_batches, open_split
from lmstack.errors import ConfigError, DataError
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.distill import DistillConfig
from lmstack.recipes.denoising import denoising_task
from lmstack.recipes.finetune_lm import _token_shards
from lmstack.train import Trainer
from lmstack.train.plots import plot_loss_curve
from lmstack.train.run_dir import prepare_run_dir
from lmstack.train.trainer import resolve_device


def spread(total: int, count: int) -> list[int]:
    """``count`` block indices spread evenly over ``total`` from the first: spread(12, 4) = [0, 3, 6, 9]."""
    return [i * total // count for i in range(count)]


def influential_layers(teacher: torch.nn.Module, count: int, calibration: list[torch.Tensor]) -> list[int]:
    """The ``count`` blocks of ``teacher`` that change their input most on ``calibration`` (block influence,
    ShortGPT: 1 - cos(x_in, x_out)), in order: the layers a shallower student keeps."""
    with torch.no_grad():
        influence = block_influence(teacher, calibration)
    return sorted(torch.topk(influence, count).indices.tolist())


def calibration_windows(data_dir: Path, block: int, windows: int = 8) -> list[torch.Tensor]:
    """Up to ``windows`` (1, block) token windows from the start of the training shards."""
    ids = torch.from_numpy(np.asarray(open_split(data_dir, "train").shards[0][:windows * block], dtype=np.int64))
    return [w[None] for w in ids.split(block) if len(w) == block] or [ids[None]]


def make_student(cfg: DistillConfig, teacher: torch.nn.Module, tokenizer,
                 calibration: list[torch.Tensor] | None = None):
    """The student model as configured (a checkpoint, or cut from the teacher; ``student.pick influence`` needs
    ``calibration`` token windows)."""
    if cfg.student.path is not None:
        files = open_model(resolve_model_dir(cfg.student.path), load=load_model)
        check_same_vocabulary(teacher, files.model, tokenizer, files.tokenizer)
        return files.model.float()
    n = teacher.config.n_layers
    if cfg.student.layers >= n:
        raise ConfigError(f"--student.layers={cfg.student.layers} must be fewer than the teacher's {n} blocks")
    if cfg.student.pick == "influence":
        layers = influential_layers(teacher, cfg.student.layers, calibration)
    else:
        layers = spread(n, cfg.student.layers)
    student = keep_layers(teacher, layers)
    if cfg.student.init == "random":
        torch.manual_seed(cfg.seed)
        student.reset_parameters()
    return student


def run(cfg: DistillConfig) -> dict:
    """Distil as configured; returns the final metrics record.

    Raises:
        ConfigError: missing --out / --teacher / data.train, a teacher that is not a decoder, a student of
            another vocabulary, a block longer than either model's context.
        DataError: the teacher has no tokenizer or end-of-text token; empty training text.
    """
    for name, value in (("--teacher", cfg.teacher), ("data.train", cfg.data.train)):
        if value is None:
            raise ConfigError(f"{name} is required")
    out = prepare_run_dir(cfg, "distill.yaml")
    files = open_model(resolve_model_dir(cfg.teacher), load=load_model)
    teacher, tokenizer = files.model.float().eval(), files.tokenizer
    if not hasattr(teacher, "layers") or not hasattr(teacher, "lm_head"):
        raise ConfigError(f"{cfg.teacher}: the teacher must be a decoder, not a {type(teacher).__name__}")
    eos_id = files.stop_ids[0] if files.stop_ids else None
    if tokenizer is None or eos_id is None:
        raise DataError(f"{cfg.teacher}: distillation needs the teacher's tokenizer and an end-of-text token")
    block = cfg.data.max_length
    limit = teacher.config.context_limit
    if limit is not None and block > limit:
        raise ConfigError(f"data.max_length={block} exceeds the teacher's context of {limit} tokens")
    data_dir = _token_shards(cfg, out, tokenizer, eos_id)
    calibration = calibration_windows(data_dir, block) if cfg.student.pick == "influence" else None
    student = make_student(cfg, teacher, tokenizer, calibration)
    limit = student.config.context_limit
    if limit is not None and block > limit:
        raise ConfigError(f"data.max_length={block} exceeds the student's context of {limit} tokens")
    device = resolve_device(cfg.train.device)
    teacher, student = teacher.to(device), student.to(device).train()
    task = denoising_task("causal_lm", tokenizer, eos_id, student.config, block, 0.0, False)
    d = cfg.distill
    objective = DistillObjective(teacher, student, loss=d.loss, temperature=d.temperature, alpha=d.alpha,
                                 beta=d.beta, hidden_weight=d.hidden_weight, attention_weight=d.attention_weight,
                                 mode=d.mode, on_policy_fraction=d.on_policy_fraction, prompt_tokens=d.prompt_tokens,
                                 sample_temperature=d.sample_temperature, seed=cfg.seed,
                                 evaluate=task.objective.evaluate)
    blocks = PackedBlocks(open_split(data_dir, "train"), task.raw_block, cfg.train.batch_size, cfg.seed)
    held = open_split(data_dir, "val") if cfg.data.eval else None
    eval_data = (lambda: eval_batches(held, task.raw_block, cfg.train.batch_size)) if held else None
    print(f"distilling {teacher.num_parameters():,} -> {student.num_parameters():,} parameters "
          f"({teacher.config.n_layers} -> {student.config.n_layers} blocks, width {teacher.config.dim} -> "
          f"{student.config.dim}); loss {d.loss}, mode {d.mode}; {blocks.data.n_tokens:,} training tokens; "
          f"device {device}")

    def checkpoint_files(directory: Path) -> None:
        tokenizer.save(directory)
        save_yaml(cfg, directory / "distill.yaml")

    trainer = Trainer(student, objective, blocks, cfg.train, out, eval_data=eval_data,
                      checkpoint_files=checkpoint_files)
    final = trainer.fit(resume=cfg.resume)
    if hasattr(student, "distill_projections"):
        del student.distill_projections  # training-only: the student's checkpoint holds the student alone
    model_dir = save_hf(student.eval(), out / "model")
    tokenizer.save(model_dir)
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=f"distillation ({out.name})")
    print(f"wrote {model_dir}")
    shown = {k: v for k, v in final.items() if k.startswith("eval_")}
    if shown:
        print("held-out (student): " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in shown.items()))
    return final
