"""`lmstack finetune --task causal_lm`: continue training a decoder on text, in full or with a PEFT method.

    lmstack finetune --task causal_lm --model.path smollm2-135m-instruct --data.train notes.jsonl \\
        --peft.method lora --out runs/smollm2-lora

Text comes from .txt / .md files (one document each) or JSONL (``data.text_field`` per row), packed into
blocks of ``data.max_length`` tokens with the model's EOS between documents. The run directory gets what
pretraining's does, and at the end ``adapter/`` (peft's adapter_config.json + adapter_model.safetensors; a
PEFT run) and ``model/`` (the merged model as a Hugging Face checkpoint with its tokenizer; a full run, or
a LoRA / DoRA / QLoRA / IA3 run unless ``peft.merge`` is false). Checkpoints of a PEFT run hold only the
adapter (and its peft-format copy).
"""

import functools
import hashlib
from pathlib import Path

import torch

from lmstack.checkpoints import is_gguf, load_model, save_hf
from lmstack.checkpoints.model_files import open_model
from lmstack.compress import GradualPruning, keep_masks_, masks_from_zeros, quantize_
from lmstack.compress.settings import keeps_zeros, read_pruning_record, write_pruning_record
from lmstack.config import save_yaml
from lmstack.data import PackedBlocks, eval_batches, open_split, read_documents, shards_match, write_token_shards
from lmstack.errors import ConfigError, DataError
from lmstack.nn.checkpointing import checkpoint_layers_
from lmstack.nn.memory import unmap_large_frees
from lmstack.nn.transforms import apply_transforms
from lmstack.peft import (apply_bottleneck, apply_ia3, apply_lora, apply_prefix_tuning, apply_prompt_tuning,
                          save_adapter, trainable_parameters)
from lmstack.peft.config import PeftSection
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.finetune import FinetuneConfig
from lmstack.recipes.denoising import denoising_task
from lmstack.recipes.distributed import Job
from lmstack.train import Trainer
from lmstack.train.plots import plot_loss_curve

# Never quantized by QLoRA (as bitsandbytes' recipe): the token table, the LM head and new task heads.
QLORA_KEEP = ("classifier*", "pooler*", "mlm_head*", "nsp_head*")


def peft_transforms(section: PeftSection, trainable: tuple[str, ...] = (), tokenizer=None) -> list:
    """The load transforms of ``section``'s method (``lmstack.nn.transforms``): [] for full fine-tuning.
    ``tokenizer`` turns prompt tuning's initialisation text into token ids."""
    lora = functools.partial(apply_lora, targets=section.targets, rank=section.rank, alpha=section.alpha,
                             dropout=section.dropout, use_rslora=section.rslora, use_dora=section.method == "dora",
                             trainable=trainable)
    method = section.method
    if method == "qlora":
        return [functools.partial(quantize_, scheme="nf4", lm_head=False, exclude=QLORA_KEEP), lora]
    if method == "prompt":
        init_ids = None
        if section.prompt_init_text:
            init_ids = tokenizer.encode(section.prompt_init_text, add_special_tokens=False)
            if not init_ids:
                raise ConfigError(f"peft.prompt_init_text {section.prompt_init_text!r} has no tokens")
        return [functools.partial(apply_prompt_tuning, num_virtual_tokens=section.virtual_tokens,
                                  init_token_ids=init_ids, trainable=trainable)]
    return {"none": [], "lora": [lora], "dora": [lora],
            "ia3": [functools.partial(apply_ia3, targets=section.targets, trainable=trainable)],
            "adapter": [functools.partial(apply_bottleneck, size=section.adapter_size,
                                          activation=section.adapter_activation,
                                          targets=section.targets or ("attn", "mlp"), trainable=trainable)],
            "prefix": [functools.partial(apply_prefix_tuning, num_virtual_tokens=section.virtual_tokens,
                                         projection=section.prefix_projection, trainable=trainable)]}[method]


def save_memory_(model: torch.nn.Module, cfg: FinetuneConfig) -> None:
    """The run's memory settings. A PEFT run (whose point is memory) and the memory-saving mode unmap freed
    large blocks (``lmstack.nn.memory``: without it glibc keeps activation-sized frees resident; SmolLM2 LoRA
    peak 0.66x -> 0.48x of full fine-tuning's); the memory-saving mode also recomputes each block's
    activations in backward (``model.activation_checkpointing``)."""
    if cfg.model.activation_checkpointing:
        checkpoint_layers_(model)
    if cfg.model.activation_checkpointing or cfg.peft.method != "none":
        unmap_large_frees()


def export(model: torch.nn.Module, cfg: FinetuneConfig, out: Path, tokenizer) -> list[Path]:
    """adapter/ (a PEFT run) and model/ (a full run, or a PEFT run that merges): what the run leaves for users."""
    written = []
    if cfg.peft.method != "none":
        written.append(save_adapter(model, out / "adapter", base_model_name_or_path=str(cfg.model.path)))
    if cfg.peft.exports_merged:
        model_dir = save_hf(model, out / "model", dequantize=cfg.peft.method == "qlora")  # merged
        tokenizer.save(model_dir)
        written.append(model_dir)
    return written


def run_causal_lm(cfg: FinetuneConfig, out: Path, job: Job | None = None) -> dict:
    """Fine-tune a decoder on ``cfg.data`` text (on every rank of ``job``'s launch); returns the final metrics
    record.

    Raises:
        ConfigError: not a decoder, a block longer than its context, PEFT settings that match nothing.
        DataError: an empty or unreadable training file.
    """
    job = job or Job(cfg.parallel)  # one process
    path = resolve_model_dir(cfg.model.path)
    # Prompt tuning starts from the tokenizer's tokens, so it is applied once both are loaded; the other
    # methods are applied to the meta model before its weights load.
    transforms = [] if cfg.peft.method == "prompt" else peft_transforms(cfg.peft)
    torch.manual_seed(cfg.seed)  # the adapters' starting values (LoRA's A) are drawn while loading
    files = open_model(path, load=functools.partial(load_model, transforms=transforms))
    model = apply_transforms(files.model, transforms) if is_gguf(path) else files.model
    if cfg.peft.method == "prompt":
        model = apply_transforms(model, peft_transforms(cfg.peft, tokenizer=files.tokenizer))
    if not hasattr(model, "lm_head") or not hasattr(model.config, "context_limit"):
        raise ConfigError(f"task causal_lm needs a decoder checkpoint; {path} holds a {type(model).__name__}")
    tokenizer, block = files.tokenizer, cfg.data.max_length
    limit = model.config.context_limit
    virtual = getattr(model, "reserved_cache_slots", 0)  # prefix / prompt tuning's virtual tokens
    if limit is not None and block + virtual > limit:
        raise ConfigError(f"data.max_length={block}{f' + {virtual} virtual tokens' if virtual else ''} exceeds the "
                          f"model's context of {limit} tokens")
    eos_id = files.stop_ids[0] if files.stop_ids else None
    if tokenizer is None or eos_id is None:
        raise DataError(f"{path}: causal_lm fine-tuning needs the model's tokenizer and an end-of-text token")
    data_dir = job.main_first(lambda main: _token_shards(cfg, out, tokenizer, eos_id, reuse_only=not main))
    device = job.device(cfg.train.device)
    save_memory_(model, cfg)
    model = model.to(device).train()
    pruning, record = pruning_callbacks(model, cfg, path, job)
    task = denoising_task("causal_lm", tokenizer, eos_id, model.config, block, 0.0, False)
    blocks = PackedBlocks(open_split(data_dir, "train"), task.raw_block, cfg.train.batch_size, cfg.seed)
    held = open_split(data_dir, "val") if cfg.data.eval else None
    eval_data = (lambda: eval_batches(held, task.raw_block, cfg.train.batch_size)) if held else None
    print(f"causal_lm on {path.name}: {trainable_parameters(model)}; {blocks.data.n_tokens:,} training tokens "
          f"({blocks.blocks_per_epoch:,} blocks of {block}); peft {cfg.peft.method}; device {device}{job.describe()}")

    def checkpoint_files(directory: Path) -> None:
        tokenizer.save(directory)
        save_yaml(cfg, directory / "finetune.yaml")
        if cfg.peft.method != "none":  # each checkpoint's adapter is loadable by peft as it is
            save_adapter(model, directory / "adapter", base_model_name_or_path=str(cfg.model.path))

    plan = job.parallelize(model, cfg.seed, peft=cfg.peft.method != "none")
    trainer = Trainer(model, task.objective, job.shard(blocks), cfg.train, out, eval_data=eval_data,
                      checkpoint_files=checkpoint_files, parallel=plan, step_callbacks=pruning)
    final = trainer.fit(resume=cfg.resume)
    rebuild = lambda: open_model(path, load=load_model).model  # noqa: E731  (full fine-tuning's starting weights)
    final = finish(job.trained_model(model, rebuild, out), cfg, out, tokenizer, final, "fine-tuning", job)
    if record is not None and job.is_main and (out / "model").is_dir():
        write_pruning_record(out / "model", record)  # the exported model says how it was pruned, too
    return final


def pruning_callbacks(model: torch.nn.Module, cfg: FinetuneConfig, path: Path, job: Job) -> tuple[list, dict | None]:
    """Keep the zeros of a pruned checkpoint (its config.json's ``pruning_config``) and set up ``prune.*``'s
    gradual pruning; returns (the Trainer's step callbacks, the pruning record for the exported model).

    Raises:
        ConfigError: pruning with a PEFT method (a merged adapter is dense) or in a distributed launch.
    """
    record = read_pruning_record(path) if path.is_dir() else None
    gradual = cfg.prune.sparsity > 0
    if not (keeps_zeros(record) or gradual):
        return [], record
    what = "gradual pruning (--prune.sparsity)" if gradual else f"the pruned checkpoint {path} (its zeros)"
    if cfg.peft.method != "none":
        raise ConfigError(f"{what} needs full fine-tuning: a merged {cfg.peft.method} adapter is dense and would "
                          "fill the zeros (use --peft.method none)")
    if job.world is not None:
        raise ConfigError(f"{what} runs in one process; launch without torchrun")
    if not gradual:
        keep_masks_(model, masks_from_zeros(model))
        return [], record
    end = cfg.prune.end_step if cfg.prune.end_step is not None else max(cfg.train.max_steps * 3 // 4, 1)
    schedule = GradualPruning(model, cfg.prune.sparsity, cfg.prune.start_step, end, cfg.prune.every,
                              scope=cfg.prune.scope)
    record = {**(record or {}), "method": "magnitude", "sparsity": cfg.prune.sparsity, "scope": cfg.prune.scope,
              "schedule": {"kind": "cubic", "start_step": cfg.prune.start_step, "end_step": end,
                           "every": cfg.prune.every}}
    return [schedule], record


def finish(model: torch.nn.Module | None, cfg, out: Path, tokenizer, final: dict, title: str,
           job: Job | None = None) -> dict:
    """After training: export (``export``), the loss curve, the held-out numbers printed (by rank 0 of a
    distributed ``job``, whose ``model`` is None on the other ranks); returns ``final``."""
    if job is not None and not job.is_main:
        job.barrier()  # until rank 0 has written the exports
        return final
    model.eval()
    for written in export(model, cfg, out, tokenizer):
        print(f"wrote {written}")
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=f"{title} ({out.name})")
    shown = {k: v for k, v in final.items() if k.startswith("eval_")}
    if shown:
        print("held-out: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in shown.items()))
    if job is not None:
        job.barrier()
    return final


def _token_shards(cfg: FinetuneConfig, out: Path, tokenizer, eos_id: int, reuse_only: bool = False) -> Path:
    """OUT/data from the training (and held-out) text, reused when a resumed run's inputs are unchanged
    (``reuse_only``: they must be, as on the ranks after rank 0 of a launch)."""
    sources = [cfg.data.train] + ([cfg.data.eval] if cfg.data.eval else [])
    fingerprint = {"sources": [[str(f), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in sources
                               if Path(f).is_file()],
                   "text_field": cfg.data.text_field, "tokenizer": hashlib.sha256(
                       repr(sorted(tokenizer.vocab.items())[:1000]).encode()).hexdigest()}
    data_dir = out / "data"
    if shards_match(data_dir, fingerprint, required=reuse_only):
        return data_dir
    splits = {"train": [d.text for d in read_documents([Path(cfg.data.train)], cfg.data.text_field)]}
    if cfg.data.eval:
        splits["val"] = [d.text for d in read_documents([Path(cfg.data.eval)], cfg.data.text_field)]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return write_token_shards(data_dir, splits, encode, vocab_size=tokenizer.vocab_size, eos_id=eos_id,
                              fingerprint=fingerprint)
