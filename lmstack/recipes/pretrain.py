"""`lmstack pretrain`: text -> tokenizer -> token shards -> decoder -> training -> checkpoints -> export.

    lmstack pretrain --config configs/pretrain/tiny.yaml --out runs/tiny [--seed S] [--resume] [--train.max_steps N]
    torchrun --nproc-per-node 4 -m lmstack pretrain --config ... --out ... --parallel.tp 2 --parallel.strategy zero3

Every key of the YAML file can be overridden by a flag of the same dotted name. The run directory gets:
    config.yaml      the resolved config          metrics.jsonl  one JSON object per optimizer step
    tokenizer/       tokenizer.json                data/          memory-mapped token shards (reused if unchanged)
    checkpoints/     step-NNNNNNN/ (HF weights + training state; the last train.keep_checkpoints; under torchrun
                     sharded by torch.distributed.checkpoint, each rank writing its own shards)
    model/           the final model as a Hugging Face directory with its tokenizer
    loss.png         the loss curve              router.png     a mixture of experts' router statistics per step
"""

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.checkpoints.hf import load_hf, save_hf
from lmstack.config import save_yaml
from lmstack.data import PackedBlocks, eval_batches, open_split, read_documents, resolve_sources, shards_match, \
    split_documents, write_token_shards
from lmstack.errors import ConfigError, DataError
from lmstack.fileio import output_directory
from lmstack.models import DecoderConfig, MoEConfig, build_model, check_exportable
from lmstack.recipes.distributed import Job, distributed
from lmstack.recipes.denoising import denoising_task, model_for_objective, special_tokens_for
from lmstack.models.presets import get_preset
from lmstack.recipes.tokenizer import train_bpe_with_progress
from lmstack.tokenizers import Tokenizer, load_tokenizer
from lmstack.train import Trainer
from lmstack.train.run_dir import prepare_run_dir
from lmstack.train.plots import plot_loss_curve, plot_router_stats
from lmstack.recipes.configs.pretrain import MoESection, PretrainConfig


@dataclass
class PretrainResult:
    out: Path
    model_dir: Path
    final: dict  # the last metrics record (loss, eval_loss, eval_ppl, eval_bpb, ...)
    seconds: float



def run(cfg: PretrainConfig) -> PretrainResult:
    """Run the whole pretraining job described by ``cfg`` (on every rank of a ``torchrun`` launch); see the
    module docstring for the outputs.

    Raises:
        ConfigError: no --out, a block longer than the model's context, a vocabulary smaller than the
            tokenizer's, an existing run without --resume, a resumed run whose config changed, or a parallel
            layout the world or the model does not fit.
        DataError: missing or empty corpus, a tokenizer without the EOS token.
        CheckpointError: --resume without a checkpoint, or a corrupted one.
    """
    started = time.perf_counter()
    with distributed(cfg.parallel) as job:
        return _run(cfg, job, started)


def _run(cfg: PretrainConfig, job: Job, started: float) -> PretrainResult:
    out, tokenizer, eos_id, data_dir, has_held = job.main_first(lambda main: _prepare(cfg, main))
    device = job.device(cfg.train.device)
    model = _model(cfg, tokenizer.vocab_size, eos_id).to(device)
    task = denoising_task(cfg.objective, tokenizer, eos_id, model.config, cfg.data.block_size,
                          cfg.mask_probability, cfg.whole_word_masking)
    blocks = PackedBlocks(open_split(data_dir, "train"), task.raw_block, cfg.train.batch_size, cfg.seed)
    held = open_split(data_dir, "val") if has_held else None
    eval_data = (lambda: task.eval_batches(eval_batches(held, task.raw_block, cfg.train.batch_size))) if held else None
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters; objective {cfg.objective}; data: "
          f"{blocks.data.n_tokens:,} training tokens ({blocks.blocks_per_epoch:,} blocks of {task.raw_block}), "
          f"{held.n_tokens if held else 0:,} held-out; device {device}{job.describe()}")

    def checkpoint_files(directory: Path) -> None:
        tokenizer.save(directory)
        save_yaml(cfg, directory / "pretrain.yaml")

    plan = job.parallelize(model, cfg.seed)
    trainer = Trainer(model, task.objective, job.shard(task.train_data(blocks)), cfg.train, out,
                      eval_data=eval_data, checkpoint_files=checkpoint_files, parallel=plan)
    final = trainer.fit(resume=cfg.resume)

    trained = job.trained_model(model, lambda: _model(cfg, tokenizer.vocab_size, eos_id), out)
    model_dir = out / "model"
    if job.is_main:
        save_hf(trained, model_dir)
        tokenizer.save(model_dir)
        plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=f"pretraining ({out.name})")
        moe = getattr(trained.config, "moe", None)
        router_png = moe and plot_router_stats(out / "metrics.jsonl", out / "router.png", moe.num_experts,
                                               f"router ({out.name})")
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "eval_loss", "eval_ppl", "eval_bpb",
                                                            "eval_mlm_accuracy", "eval_nsp_accuracy",
                                                            "eval_accuracy") if k in final)
        print(f"step {final.get('step', trainer.step)}: {summary}\nmodel: {model_dir}\nloss curve: "
              f"{out / 'loss.png'}" + (f"\nrouter statistics: {router_png}" if router_png else ""))
    job.barrier()  # every rank returns once the model folder is written
    return PretrainResult(out, model_dir, final, time.perf_counter() - started)


def _prepare(cfg: PretrainConfig, main: bool) -> tuple[Path, Tokenizer, int, Path, bool]:
    """The run directory, tokenizer, EOS id and token shards (rank 0 makes them; the other ranks, after it,
    find them: the tokenizer it trained, shards whose fingerprint matches), and whether there is a held-out split."""
    out = prepare_run_dir(cfg, "pretrain.yaml") if main else output_directory(cfg.out, "--out")
    files = resolve_sources(cfg.data.sources)
    documents = read_documents(files, cfg.data.text_field)
    train_docs, held_docs = split_documents(documents, cfg.data.held_out, cfg.seed)
    tokenizer = _tokenizer(cfg, out, [d.text for d in train_docs], reuse=not main)
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    if eos_id is None:
        raise DataError(f"the tokenizer has no EOS token {cfg.tokenizer.eos_token!r} (set tokenizer.eos_token)")
    data_dir = _token_shards(cfg, out, files, tokenizer, eos_id, [d.text for d in train_docs],
                             [d.text for d in held_docs], reuse_only=not main)
    return out, tokenizer, eos_id, data_dir, bool(held_docs)


def _tokenizer(cfg: PretrainConfig, out: Path, train_texts: list[str], reuse: bool = False) -> Tokenizer:
    """The configured tokenizer, the run's own (when resuming, or ``reuse``: rank 0 just trained it), or a
    new BPE trained on the training split."""
    if cfg.tokenizer.path is not None:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    elif (cfg.resume or reuse) and (out / "tokenizer" / "tokenizer.json").exists():
        tokenizer = load_tokenizer(out / "tokenizer")
    else:
        specials = [cfg.tokenizer.eos_token, *special_tokens_for(cfg.objective, cfg.data.block_size)]
        tokenizer = train_bpe_with_progress(train_texts, cfg.tokenizer.vocab_size, specials, cfg.tokenizer.pattern)
        tokenizer.save(out / "tokenizer")
        print(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens -> {out / 'tokenizer'}")
    if not isinstance(tokenizer, Tokenizer):
        raise DataError(f"pretraining needs a tokenizer.json pipeline tokenizer (BPE or Unigram), got a "
                        f"{type(tokenizer).__name__}")
    return tokenizer


def _token_shards(cfg: PretrainConfig, out: Path, files: list[Path], tokenizer: Tokenizer, eos_id: int,
                  train_texts: list[str], held_texts: list[str], reuse_only: bool = False) -> Path:
    """Tokenize into OUT/data, unless a dataset made from the same inputs (``files`` et al.) is already there
    (``reuse_only``: it must be; a rank other than 0 never writes)."""
    fingerprint = {"sources": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
                   "text_field": cfg.data.text_field, "held_out": cfg.data.held_out, "seed": cfg.seed,
                   "tokenizer": _tokenizer_hash(tokenizer)}
    data_dir = out / "data"
    if shards_match(data_dir, fingerprint, required=reuse_only):
        return data_dir
    splits = {"train": train_texts, **({"val": held_texts} if held_texts else {})}
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return write_token_shards(data_dir, splits, encode, vocab_size=tokenizer.vocab_size, eos_id=eos_id,
                              fingerprint=fingerprint)


def _tokenizer_hash(tokenizer: Tokenizer) -> str:
    """The same for a tokenizer just trained and the one read back from its tokenizer.json (whose merges come
    back as tuples, its vocabulary in file order), so rank 0's shards and a resumed run's are recognised."""
    canonical = (sorted(tokenizer.vocab.items()), [tuple(m) for m in tokenizer.merges])
    return hashlib.sha256(repr(canonical).encode()).hexdigest()


def _with_experts(config: DecoderConfig, section: MoESection) -> DecoderConfig:
    """``config`` with the model.moe keys applied. A dense Llama preset made a mixture becomes Mixtral (the
    family whose checkpoints hold it); experts default to the model's ffn_dim, as Mixtral has one width."""
    keys = {k: v for k, v in dataclasses.asdict(section).items() if v is not None}
    if not keys:
        return config
    if config.moe is None:
        if "num_experts" not in keys:
            raise ConfigError(f"moe: the preset is dense; set moe.num_experts to make it a mixture of experts "
                              f"(got {sorted(keys)})")
        model_type = "mixtral" if config.model_type == "llama" else config.model_type
        return dataclasses.replace(config, model_type=model_type,
                                   moe=MoEConfig(**{"expert_dim": config.ffn_dim, **keys}))
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, **keys))


def _model(cfg: PretrainConfig, tokenizer_vocab: int, eos_id: int) -> torch.nn.Module:
    """Build (seeded) or load the model and check it against the tokenizer and the block size."""
    m = cfg.model
    if m.from_hf is not None:
        model = load_hf(m.from_hf).train()
        config = model.config
    else:
        overrides = {k: v for k, v in dataclasses.asdict(m).items()
                     if k not in ("preset", "from_hf", "vocab_size", "moe") and v is not None}
        vocab = m.vocab_size if m.vocab_size is not None else tokenizer_vocab
        try:
            preset = get_preset(m.preset)
            if not isinstance(preset, DecoderConfig):
                return build_model(model_for_objective(preset, cfg.objective, overrides, vocab), seed=cfg.seed).train()
            # Sizes the preset derived (head_dim = dim // n_heads, n_kv_heads = n_heads) follow the overrides.
            if preset.head_dim == preset.dim // preset.n_heads:
                overrides.setdefault("head_dim", None)
            if preset.n_kv_heads == preset.n_heads:
                overrides.setdefault("n_kv_heads", None)
            config = dataclasses.replace(preset, **overrides, vocab_size=vocab, eos_token_id=eos_id, bos_token_id=eos_id)
            config = _with_experts(config, m.moe)
            check_exportable(config)  # the run ends with save_hf: refuse now, not after training
        except ConfigError as error:
            raise ConfigError(f"model: {error}") from None
        model = build_model(config, seed=cfg.seed).train()
    if config.vocab_size < tokenizer_vocab:
        raise ConfigError(f"the tokenizer has {tokenizer_vocab} tokens but the model's vocabulary is "
                          f"{config.vocab_size} (model.vocab_size / the checkpoint's embeddings)")
    limit = config.context_limit
    if limit is not None and cfg.data.block_size > limit:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds the model's context of {limit} tokens "
                          f"(model.max_seq_len)")
    return model
