"""`lmstack finetune`: fine-tune an encoder checkpoint for sequence / pair classification or NER, or a decoder
on text (``--task causal_lm``, in ``finetune_lm``); in full or with
``--peft.method lora|dora|qlora|ia3|adapter|prefix|prompt``.

    lmstack finetune --config configs/finetune/sentiment-minilm.yaml --out runs/sentiment
    lmstack finetune --config configs/finetune/ner-minilm.yaml --out runs/ner --peft.method lora

Data: CSV or JSONL with named columns (text [+ text_pair] + label; or JSONL words + BIO tags). The label
set comes from data.labels or the training file. A checkpoint without a task head (BertModel, a
pretraining checkpoint) gets a new, randomly initialised one; a checkpoint whose head is for another task
or other labels is an error unless model.reset_head is set. The run directory gets metrics.jsonl,
loss.png, checkpoints/, model/ (HF format + tokenizer, loadable by transformers; adapters merged) and, for a
PEFT run, adapter/ (peft's files, the trained task head as its modules_to_save).
"""

import dataclasses
import time
from pathlib import Path

import torch

from lmstack.checkpoints.hf import load_hf
from lmstack.config import save_yaml
from lmstack.data.labeled import (encode_sequences, encode_tagged, eval_example_batches, label_ids, label_set,
                                  read_rows, ExampleBatches)
from lmstack.errors import ConfigError
from lmstack.fileio import output_directory
from lmstack.models import Encoder
from lmstack.models.config import LABELED_HEADS
from lmstack.nn.transforms import apply_transforms
from lmstack.peft import trainable_parameters
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.distributed import distributed, one_process_only
from lmstack.recipes.finetune_lm import export, peft_transforms, run_causal_lm, save_memory_
from lmstack.tokenizers import WordPieceTokenizer, load_tokenizer
from lmstack.train import Trainer
from lmstack.train.run_dir import prepare_run_dir
from lmstack.train.classify import ClassificationObjective
from lmstack.train.plots import plot_loss_curve
from lmstack.train.trainer import resolve_device
from lmstack.recipes.configs.finetune import FinetuneConfig


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune as configured; returns the final held-out metrics (and prints them).

    Raises:
        ConfigError: missing --out / model.path / data.train, a checkpoint that is not an encoder, or a
            head that does not match the task.
        DataError: missing columns, labels outside the label set, rows over max_length without truncate.
    """
    started = time.perf_counter()
    for name, value in (("--out", cfg.out), ("model.path", cfg.model.path), ("data.train", cfg.data.train)):
        if value is None:
            raise ConfigError(f"{name} is required")
    if cfg.task == "causal_lm":
        with distributed(cfg.parallel) as job:
            out = job.main_first(lambda main: prepare_run_dir(cfg, "finetune.yaml") if main
                                 else output_directory(cfg.out, "--out"))
            return run_causal_lm(cfg, out, job)
    one_process_only(cfg.parallel, f"finetune --task {cfg.task}")
    if cfg.prune.sparsity:
        raise ConfigError(f"--prune.sparsity (gradual pruning) is for --task causal_lm, not {cfg.task}")
    out = prepare_run_dir(cfg, "finetune.yaml")  # pretrain's rules: one run per directory, resumed as it was
    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(model_dir)
    if not isinstance(tokenizer, WordPieceTokenizer):
        raise ConfigError(f"{model_dir}: fine-tuning expects a BERT WordPiece tokenizer (vocab.txt)")
    train_rows = read_rows(cfg.data.train, _columns(cfg))
    labels = tuple(cfg.data.labels) if cfg.data.labels else _labels_from(cfg, train_rows)
    train_set = _encode(cfg, tokenizer, train_rows, labels, str(cfg.data.train))
    eval_set = _encode(cfg, tokenizer, read_rows(cfg.data.eval, _columns(cfg)), labels, str(cfg.data.eval)) \
        if cfg.data.eval else None

    device = resolve_device(cfg.train.device)
    model = with_task_head(load_hf(model_dir), cfg.task, labels, cfg.model.reset_head, cfg.seed)
    # The new task head trains in full beside the adapters (peft's modules_to_save); seeded adapter init.
    torch.manual_seed(cfg.seed + 1)
    model = apply_transforms(model, peft_transforms(cfg.peft, trainable=("classifier", "pooler"), tokenizer=tokenizer))
    save_memory_(model, cfg)
    model = model.to(device)
    pad_id = tokenizer.vocab[tokenizer.pad_token]
    objective = ClassificationObjective(labels)
    eval_data = (lambda: eval_example_batches(eval_set, cfg.train.batch_size, pad_id)) if eval_set else None
    print(f"{cfg.task}: {len(labels)} labels {list(labels)}; {len(train_set.input_ids)} training rows"
          f"{f', {len(eval_set.input_ids)} held-out' if eval_set else ''}; {trainable_parameters(model)}; peft "
          f"{cfg.peft.method}; on {device}")

    def checkpoint_files(directory: Path) -> None:
        tokenizer.save(directory)
        save_yaml(cfg, directory / "finetune.yaml")

    trainer = Trainer(model, objective, ExampleBatches(train_set, cfg.train.batch_size, cfg.seed, pad_id), cfg.train,
                      out, eval_data=eval_data, checkpoint_files=checkpoint_files)
    final = trainer.fit(resume=cfg.resume)
    written = export(model.eval(), cfg, out, tokenizer)  # adapter/ (+ the trained head) and/or model/ (merged)
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=f"fine-tuning ({out.name})")
    shown = {k: v for k, v in final.items() if k.startswith("eval_")}
    print("held-out: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in shown.items()))
    print(f"wrote {', '.join(map(str, written))} ({time.perf_counter() - started:.0f} s)")
    return final


def with_task_head(model: torch.nn.Module, task: str, labels: tuple[str, ...], reset_head: bool,
                   seed: int) -> Encoder:
    """``model`` with a ``task`` head over ``labels``: kept if it already is one, else a new head on its body.

    Raises:
        ConfigError: not an encoder, or a task head for another task / label set without ``reset_head``.
    """
    if not isinstance(model, Encoder):
        raise ConfigError(f"fine-tuning needs an encoder checkpoint (BERT); this one is a {type(model).__name__}")
    config = model.config
    if config.head == task and config.labels == labels:
        return model.train()
    if config.head in LABELED_HEADS and not reset_head:
        raise ConfigError(f"the checkpoint's head is {config.head} over labels {list(config.labels)}, but this task "
                          f"is {task} over {list(labels)}; set model.reset_head true to replace the head")
    torch.manual_seed(seed)
    fresh = Encoder(dataclasses.replace(config, head=task, labels=labels))
    heads = ("mlm_head.", "nsp_head.", "classifier.") + (() if fresh.pooler is not None else ("pooler.",))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith(heads)}
    missing, unexpected = fresh.load_state_dict(body, strict=False)
    new = [k for k in missing if not k.startswith(("classifier.", "pooler."))]
    if new or unexpected:
        raise ConfigError(f"cannot move the encoder body onto a {task} head: missing {new}, unexpected {unexpected}")
    return fresh.train()


def _columns(cfg: FinetuneConfig) -> list[str]:
    d = cfg.data
    if cfg.task == "token_classification":
        return [d.tokens_field, d.tags_field]
    return [d.text_field, d.label_field] + ([d.text_pair_field] if d.text_pair_field else [])


def _labels_from(cfg: FinetuneConfig, rows: list[dict]) -> tuple[str, ...]:
    if cfg.task == "token_classification":
        return label_set([str(t) for row in rows for t in row[cfg.data.tags_field]], outside_first=True)
    return label_set([str(row[cfg.data.label_field]) for row in rows])


def _encode(cfg: FinetuneConfig, tokenizer, rows: list[dict], labels: tuple[str, ...], where: str):
    d = cfg.data
    if cfg.task == "token_classification":
        for n, row in enumerate(rows, 1):
            if not isinstance(row[d.tokens_field], list) or not isinstance(row[d.tags_field], list):
                raise ConfigError(f"{where}: row {n}: {d.tokens_field!r} and {d.tags_field!r} must be lists "
                                  "(token classification reads JSONL)")
        tags = [label_ids(row[d.tags_field], labels, where) for row in rows]
        encoded = encode_tagged(tokenizer, [row[d.tokens_field] for row in rows], tags, d.max_length, d.truncate, where)
    else:
        pairs = [str(row[d.text_pair_field]) for row in rows] if d.text_pair_field else None
        encoded = encode_sequences(tokenizer, [str(row[d.text_field]) for row in rows], pairs,
                                   label_ids([row[d.label_field] for row in rows], labels, where),
                                   d.max_length, d.truncate, where)
    if encoded.truncated:
        print(f"{where}: truncated {encoded.truncated} of {len(rows)} rows to max_length={d.max_length}")
    return encoded
