"""`lmstack sft`, `lmstack dpo`, `lmstack reward`: align a decoder on the one training loop.

    lmstack sft --model.path smollm2-135m-instruct --data.train chats.jsonl --data.packing true --out runs/sft
    lmstack dpo --model.path runs/sft/model --data.train pairs.jsonl --loss ipo --peft.method lora --out runs/dpo
    lmstack reward --model.path runs/sft/model --data.train pairs.jsonl --out runs/rm

Each run directory gets what fine-tuning's does: metrics.jsonl (the objective's numbers: reward margins
and accuracies for preference runs), loss.png, checkpoints/ (resumable; adapter-only for PEFT runs), and
model/ (a Hugging Face checkpoint with its tokenizer: merged adapters; a reward model saved as
...ForSequenceClassification) plus adapter/ for a PEFT run. The data rules are ``lmstack.data.sft`` /
``lmstack.data.preference``'s: rows over ``data.max_length`` and identical pairs are skipped and counted.
"""

import copy
import functools
from pathlib import Path

import torch

from lmstack.align import KTOObjective, PreferenceObjective, Reference, RewardObjective
from lmstack.checkpoints import is_gguf, load_model
from lmstack.checkpoints.model_files import open_model
from lmstack.config import save_yaml
from lmstack.data.preference import PairBatches, encode_pairs, encode_unpaired, eval_pair_batches, read_preference_rows
from lmstack.data.sft import SFTBatches, encode_sft, eval_sft_batches, read_sft_rows
from lmstack.errors import ConfigError, DataError
from lmstack.fileio import output_directory
from lmstack.models.heads import with_score_head
from lmstack.nn.transforms import apply_transforms
from lmstack.parallel.config import ParallelConfig
from lmstack.peft import save_adapter, trainable_parameters
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.align import DPOConfig, RewardConfig, SFTConfig
from lmstack.recipes.distributed import Job, distributed, one_process_only
from lmstack.recipes.finetune_lm import finish, peft_transforms, save_memory_
from lmstack.train import CausalLMObjective, Trainer
from lmstack.train.run_dir import prepare_run_dir


def _load(cfg, trainable: tuple[str, ...] = (), score_head: bool = False):
    """(model with the PEFT method applied, its files, the untouched starting model's path)."""
    for name, value in (("model.path", cfg.model.path), ("data.train", cfg.data.train)):
        if value is None:
            raise ConfigError(f"{name} is required")
    if cfg.peft.method in ("prefix", "prompt") and getattr(cfg.data, "packing", False):
        raise ConfigError("data.packing cannot be combined with prefix / prompt tuning (virtual tokens would be "
                          "shared across the packed conversations)")
    path = resolve_model_dir(cfg.model.path)
    torch.manual_seed(cfg.seed)
    transforms = [] if score_head else peft_transforms(cfg.peft, trainable)
    files = open_model(path, load=functools.partial(load_model, transforms=transforms))
    model = apply_transforms(files.model, transforms) if is_gguf(path) else files.model
    if not hasattr(model, "lm_head"):
        raise ConfigError(f"alignment needs a decoder language model; {path} holds a {type(model).__name__}")
    if score_head:  # the head first, then the method (its new head trains in full: modules_to_save)
        model = with_score_head(model, 1)
        model = apply_transforms(model, peft_transforms(cfg.peft, ("score*",)))
    if files.tokenizer is None or not files.stop_ids:
        raise DataError(f"{path}: alignment needs the model's tokenizer and an end-of-text token")
    return model, files, path


def _pad_id(files) -> int:
    pad = getattr(files.model.config, "pad_token_id", None)
    return pad if pad is not None else files.stop_ids[0]


def _fit(cfg, model, files, objective, train_data, eval_data, out: Path, job: str, policy=None,
         launch: Job | None = None) -> dict:
    """Train ``model`` (for PPO the policy-and-value pair; ``policy`` is what the run exports), on every rank of
    ``launch`` (a distributed job) or in this one process."""
    policy = model if policy is None else policy
    launch = launch or Job(ParallelConfig())  # one process
    device = launch.device(cfg.train.device)
    save_memory_(model, cfg)
    model.to(device).train()
    reference = getattr(objective, "reference", None) or getattr(train_data, "reference", None)
    if reference is not None and reference.model is not None:
        reference.model.to(device)

    def checkpoint_files(directory: Path) -> None:
        files.tokenizer.save(directory)
        save_yaml(cfg, directory / f"{job}.yaml")
        if cfg.peft.method != "none":
            save_adapter(policy, directory / "adapter", base_model_name_or_path=str(cfg.model.path))

    print(f"{job} on {Path(cfg.model.path).name}: {trainable_parameters(model)}; peft {cfg.peft.method}; "
          f"device {device}{launch.describe()}")
    plan = launch.parallelize(model, cfg.seed, peft=cfg.peft.method != "none")
    final = Trainer(model, objective, launch.shard(train_data), cfg.train, out, eval_data=eval_data,
                    checkpoint_files=checkpoint_files, parallel=plan).fit(resume=cfg.resume)
    rebuild = lambda: open_model(resolve_model_dir(cfg.model.path), load=load_model).model  # noqa: E731
    return finish(launch.trained_model(policy, rebuild, out), cfg, out, files.tokenizer, final, job, launch)


def sft(cfg: SFTConfig) -> dict:
    """Supervised fine-tuning on chat rows (on every rank of a ``torchrun`` launch); returns the final metrics
    record."""
    with distributed(cfg.parallel) as launch:
        out = launch.main_first(lambda main: prepare_run_dir(cfg, "sft.yaml") if main
                                else output_directory(cfg.out, "--out"))
        return _sft(cfg, out, launch)


def _sft(cfg: SFTConfig, out: Path, launch: Job) -> dict:
    model, files, _ = _load(cfg)
    template, tok = files.chat_template.text, files.tokenizer
    if files.chat_template.is_builtin:
        print(f"note: {cfg.model.path} has no chat template; using the builtin ChatML")
    encode = lambda p: encode_sft(read_sft_rows(p), tok, template, files.stop_ids[0], cfg.data.max_length)  # noqa: E731
    train = encode(cfg.data.train)
    print(f"train: {train.report()}")
    pad = _pad_id(files)
    batches = SFTBatches(train.examples, cfg.train.batch_size, cfg.seed, pad, cfg.data.max_length, cfg.data.packing)
    held = encode(cfg.data.eval) if cfg.data.eval else None
    eval_data = (lambda: eval_sft_batches(held.examples, cfg.train.batch_size, pad)) if held else None
    token_bytes = torch.tensor(tok.byte_lengths() + [0] * (model.config.vocab_size - tok.vocab_size))
    return _fit(cfg, model, files, CausalLMObjective(token_bytes), batches, eval_data, out, "sft", launch=launch)


def _pairs(cfg, files, unpaired: bool = False):
    encode = encode_unpaired if unpaired else encode_pairs
    template = None if files.chat_template.is_builtin else files.chat_template.text

    def read(path):
        return encode(read_preference_rows(path, unpaired), files.tokenizer, template, files.stop_ids[0],
                      cfg.data.max_length)
    train = read(cfg.data.train)
    print(f"train: {train.report()}")
    pad = _pad_id(files)
    batches = PairBatches(train.examples, cfg.train.batch_size, cfg.seed, pad, unpaired)
    held = read(cfg.data.eval) if cfg.data.eval else None
    eval_data = (lambda: eval_pair_batches(held.examples, cfg.train.batch_size, pad, unpaired)) if held else None
    return batches, eval_data


def dpo(cfg: DPOConfig) -> dict:
    """Preference optimisation with ``cfg.loss``; returns the final metrics record."""
    one_process_only(cfg.parallel, "dpo")
    out = prepare_run_dir(cfg, "dpo.yaml")
    model, files, path = _load(cfg)
    reference = None
    if cfg.loss not in ("simpo", "orpo"):
        if cfg.reference is not None:
            reference = Reference(open_model(resolve_model_dir(cfg.reference), load=load_model).model)
        else:  # the starting weights: the policy's own base (PEFT), else a frozen copy
            reference = Reference.for_policy(model, None if cfg.peft.method != "none" else copy.deepcopy(model))
    if cfg.loss == "kto":
        objective = KTOObjective(cfg.beta, reference=reference)
    else:
        objective = PreferenceObjective(cfg.loss, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, reference)
    batches, eval_data = _pairs(cfg, files, unpaired=cfg.loss == "kto")
    return _fit(cfg, model, files, objective, batches, eval_data, out, "dpo")


def reward(cfg: RewardConfig) -> dict:
    """Train a reward model (scalar head, Bradley-Terry); returns the final metrics record."""
    one_process_only(cfg.parallel, "reward")
    out = prepare_run_dir(cfg, "reward.yaml")
    model, files, _ = _load(cfg, score_head=True)
    model.config.pad_token_id = _pad_id(files)  # transformers pools each row at its last non-pad token
    batches, eval_data = _pairs(cfg, files)
    return _fit(cfg, model, files, RewardObjective(cfg.center_coefficient), batches, eval_data, out, "reward")
