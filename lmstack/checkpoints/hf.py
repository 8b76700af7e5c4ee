"""Hugging Face format: load and save ``config.json`` + ``model.safetensors`` (or sharded) directories.

Generic over the family registry: read config.json -> pick the Family -> map the config -> build the
model on the meta device -> plan HF tensor names from the model's own state dict -> check names and
shapes against the safetensors headers (no data read yet) -> stream tensors through the map ->
``load_state_dict(assign=True, strict=True)``. Saving is the same map in reverse.
"""

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmstack.checkpoints.io import (INDEX_FILE, SINGLE_FILE, TensorInfo, index_checkpoint, load_tensors,
                                    parse_size, read_json, write_json, write_safetensors)
from lmstack.errors import CheckpointError, ConfigError
from lmstack.models import hf_configs
from lmstack.models.registry import Family, TensorRule, family_for_config, family_for_hf_config
from lmstack.nn.memory import release_freed_memory
from lmstack.nn.transforms import (Transform, added_tensor_names, apply_transforms, base_state_dict, initialize_added_,
                                   split_transforms)

log = logging.getLogger("lmstack")
CONFIG_FILE = "config.json"
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class CheckpointPlan:
    """A checkpoint directory matched against a model built on the meta device (no weights read yet)."""

    directory: Path
    family: Family
    model: nn.Module  # on the meta device
    tensors: dict[str, TensorInfo]  # HF name (with base prefix) -> where and how it is stored
    plan: dict[str, tuple[TensorRule, tuple[str, ...]]]  # HF name -> (rule, our names)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The floating dtype most stored weights use."""
        counts: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.torch_dtype is not None and info.torch_dtype.is_floating_point:
                counts[info.torch_dtype] = counts.get(info.torch_dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32


def inspect_hf(path: str | os.PathLike) -> CheckpointPlan:
    """Validate an HF directory against the model its config.json describes, reading headers only.

    Raises:
        CheckpointError: missing path or files, corrupted files, missing/unexpected tensors, shape mismatches.
        ConfigError: config.json names an unsupported family or holds invalid values.
    """
    directory = _checkpoint_dir(Path(path))
    config_path = directory / CONFIG_FILE
    hf_config = read_json(config_path)
    quantized = hf_config.get("quantization_config")
    if isinstance(quantized, dict) and quantized.get("quant_method") == "lmstack":
        raise CheckpointError(f"{directory} holds a quantized model ({quantized.get('scheme')}): load it with "
                              f"lmstack.compress.files.load_quantized (lmstack generate and chat read it directly)")
    try:
        family = family_for_hf_config(hf_config)
        config = family.config_from_hf(hf_config)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{config_path}: {error}") from None
    tensors = _normalize_names(index_checkpoint(directory), family)
    _check_layer_count(config_path, config, tensors)
    model = family.build_empty(config)
    full_plan = family.hf_plan(list(model.state_dict()))  # tied copies included
    if _stored_copy_differs(model, full_plan, tensors):
        # As transformers does: a tied config whose file stores a *different* head keeps them apart
        # (T5 v1.1 saved by transformers 5 says tie_word_embeddings=true and stores its own lm_head).
        config = config.replace(tie_embeddings=False)
        model = family.build_empty(config)
        full_plan = family.hf_plan(list(model.state_dict()))
    plan = family.hf_plan(our_tensor_names(model))
    # Tied copies (a tied lm_head, say) may be stored or not; either way they are not read.
    _check_names(directory, family, tensors, plan, optional=set(full_plan) - set(plan))
    _check_shapes(model, tensors, plan)
    return CheckpointPlan(directory, family, model, tensors, plan)


def load_hf(path: str | os.PathLike, *, device: str | torch.device = "cpu",
            dtype: str | torch.dtype = "auto", transforms: list[Transform] = ()) -> nn.Module:
    """Load a Hugging Face-format checkpoint directory into an lmstack model, in eval mode.

    Args:
        path: directory with config.json and model.safetensors (or model.safetensors.index.json + shards).
        device: where the weights go.
        dtype: "auto" (float32 on CPU, the stored dtype elsewhere), "stored", or a dtype or its name.
        transforms: callables ``t(model)`` (``partial(apply_lora, rank=8)``, ...) applied in order. Those
            that can run on the meta device do, before any weight is read (see ``lmstack.nn.transforms``):
            only the base model's tensors are planned and loaded, then each transform's added tensors get
            their starting values. A transform with ``needs_weights`` (quantization), and every one after
            it, runs on the loaded model.
    Returns:
        The model: a Decoder, Encoder or EncoderDecoder as config.json's ``model_type`` says, with
        ``model.config`` its config; a decoder's ``model(input_ids)`` gives (B, T, vocab) logits.
    Raises:
        CheckpointError, ConfigError: see ``inspect_hf``.
    """
    checkpoint = inspect_hf(path)
    device = torch.device(device)
    target = resolve_dtype(dtype, device, checkpoint.stored_dtype)
    by_file: dict[Path, list[TensorInfo]] = {}
    for hf_name, (rule, _) in checkpoint.plan.items():
        if rule.save_only:
            continue
        info = checkpoint.tensors[hf_name]
        by_file.setdefault(info.file, []).append(info)
    stored_to_hf = {info.name: hf for hf, info in checkpoint.tensors.items()
                    if hf in checkpoint.plan and not checkpoint.plan[hf][0].save_only}
    state: dict[str, torch.Tensor] = {}
    for file, infos in by_file.items():
        for stored_name, tensor in load_tensors(file, [info.name for info in infos]):
            rule, ours = checkpoint.plan[stored_to_hf[stored_name]]
            for name, value in zip(ours, rule.to_ours(tensor)):
                state[name] = value.to(device=device, dtype=target)
    on_meta, on_weights = split_transforms(transforms)
    model = apply_transforms(checkpoint.model, on_meta)
    report_non_finite(state, checkpoint.directory)
    for alias, source in tied_aliases(model).items():
        state[alias] = state[source]
    load_base_state(model, state)
    model.tie_weights()  # assign=True replaced the shared Parameter objects: share them again
    initialize_added_(model)
    if not on_weights:
        return model.eval()
    model = apply_transforms(model, on_weights)
    del state
    # A quantizer replaced most weights by codes. The tensors left (norms, an fp32 embedding) may still be
    # views of the memory-mapped safetensors file, which keeps every page of it that quantization read
    # resident: copy them out so the mapping closes, and give freed heap memory back (release_freed_memory).
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    model.tie_weights()
    release_freed_memory()
    return model.eval()


def load_base_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(state, assign=True)`` that expects every tensor but the ones transforms added."""
    added = added_tensor_names(model)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - added)
    if missing or result.unexpected_keys:  # the plan was made from this model: a transform renamed base tensors
        raise CheckpointError(f"transformed model does not hold the base tensors it planned: missing {_few(missing)}, "
                              f"unexpected {_few(result.unexpected_keys)}")


def _check_layer_count(config_path: Path, config, tensors: dict[str, TensorInfo]) -> None:
    """Refuse a config.json claiming more layers than the files store, before a model of that size is built
    (n_layer = 50,000,000 would otherwise hang building modules)."""
    claimed = max(getattr(config, "n_layers", 0) or 0, getattr(config, "n_decoder_layers", 0) or 0)
    stored = 1 + max((int(i) for name in tensors for i in re.findall(r"\.(\d+)\.", name)), default=-1)
    if claimed > stored:
        raise CheckpointError(f"{config_path}: the config says {claimed} layers, but the weights hold tensors for "
                              f"{stored}")


def report_non_finite(state: dict[str, torch.Tensor], source) -> list[str]:
    """Warn (log) about tensors holding NaN or inf: such weights load, but everything they compute is
    garbage (generation then refuses with a NumericalError). Returns their names."""
    bad = [name for name, t in state.items() if not is_finite(t)]
    if bad:
        log.warning("%s: %d tensor(s) hold NaN or inf values: %s", source, len(bad), _few(bad))
    return bad


def is_finite(tensor: torch.Tensor) -> bool:
    """False if a floating-point ``tensor`` holds NaN or inf."""
    # A sum is NaN or inf if any element is (for weights of sane size; accumulated in fp32 so that half
    # precision cannot overflow), and unlike isfinite it allocates nothing: a full-size mask costs more
    # than the check itself (first touch of fresh memory).
    return not tensor.is_floating_point() or math.isfinite(float(tensor.sum(dtype=torch.float32)))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The compute dtype: "auto" means float32 on CPU (no fast half-precision there), else as stored."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else stored
    if dtype == "stored":
        return stored
    if dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise ConfigError(f"unknown dtype {dtype!r}; expected 'auto', 'stored' or one of {sorted(_DTYPE_NAMES)}")


def _stored_copy_differs(model: nn.Module, full_plan: dict[str, tuple[TensorRule, tuple[str, ...]]],
                         tensors: dict[str, TensorInfo]) -> bool:
    """True if the checkpoint stores a tied parameter's copy with values other than its source's."""
    aliases = tied_aliases(model)
    if not aliases:
        return False
    hf_name = {names[0]: hf for hf, (rule, names) in full_plan.items() if len(names) == 1 and not rule.save_only}
    for alias, source in aliases.items():
        if alias in hf_name and hf_name[alias] in tensors and source in hf_name:
            alias_info, source_info = tensors[hf_name[alias]], tensors[hf_name[source]]
            (_, a), = load_tensors(alias_info.file, [alias_info.name])
            (_, b), = load_tensors(source_info.file, [source_info.name])
            if a.shape != b.shape or not torch.equal(a, b):
                return True
    return False


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameters shared under a second name (a tied lm_head): {alias: the name seen first}."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def our_tensor_names(model: nn.Module) -> list[str]:
    """State-dict names that a checkpoint must provide (a tied copy is its source, not a tensor)."""
    aliases = tied_aliases(model)
    return [name for name in model.state_dict() if name not in aliases]


def _checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.name in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory (config.json + model.safetensors)")
    return path


def _normalize_names(tensors: dict[str, TensorInfo], family: Family) -> dict[str, TensorInfo]:
    """Stored names as the family's rules spell them: checkpoints saved from the bare base model (e.g. the
    original "gpt2") lack the base prefix, and older files store some tensors under other names."""
    prefix = family.base_prefix
    if prefix and not any(name.startswith(prefix) for name in tensors):
        tensors = {(name if name.startswith("lm_head.") else prefix + name): info for name, info in tensors.items()}
    for name, older in family.stored_fallbacks:
        if name not in tensors and older in tensors:
            tensors = {**tensors, name: tensors[older]}
    return tensors


def _check_names(directory: Path, family: Family, tensors: dict[str, TensorInfo],
                 plan: dict[str, tuple[TensorRule, tuple[str, ...]]], optional: set[str]) -> None:
    missing = sorted(name for name, (rule, _) in plan.items() if name not in tensors and not rule.save_only)
    if missing:
        raise CheckpointError(f"{directory}: missing tensors {_few(missing)} that config.json's "
                              f"{family.model_type} model needs")
    unexpected = sorted(name for name in tensors if name not in plan and name not in optional
                        and not family.is_ignored(name))
    if unexpected:
        files = sorted({tensors[n].file.name for n in unexpected})
        raise CheckpointError(f"{directory}: unexpected tensors {_few(unexpected)} in {files}; config.json's "
                              f"{family.model_type} model has no such parameters")


def _check_shapes(model: nn.Module, tensors: dict[str, TensorInfo],
                  plan: dict[str, tuple[TensorRule, tuple[str, ...]]]) -> None:
    """Compare stored shapes with the shapes the meta model implies, before any data is read."""
    ours = model.state_dict()
    for hf_name, (rule, names) in plan.items():
        if hf_name not in tensors:
            continue  # a save-only copy this file lacks
        info = tensors[hf_name]
        expected = tuple(rule.to_hf(tuple(ours[n] for n in names)).shape)
        if info.shape != expected:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, but config.json "
                                  f"implies {list(expected)}")
        if info.torch_dtype is None or not info.torch_dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}; expected floating point")


def _few(names: list[str], n: int = 6) -> str:
    return str(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def save_hf(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
            dtype: str | torch.dtype | None = None, dequantize: bool = False) -> Path:
    """Save ``model`` as a Hugging Face-format directory that ``transformers`` loads with the same logits.

    Writes config.json and model.safetensors, or numbered shards plus model.safetensors.index.json when
    the weights exceed ``max_shard_size``. Each file is written to a temporary name and renamed into
    place; shards of an earlier save in the same directory are removed only after the new ones exist.
    Other files in the directory (a tokenizer, say) are left alone.

    Args:
        model: an lmstack model with ``.config``; transforms that can be merged (LoRA, DoRA, IA3) are
            written merged (the model itself is left as it is).
        path: output directory (created if needed).
        max_shard_size: e.g. "5GB", "200MB" or bytes.
        dtype: cast floating weights to this dtype; None keeps the model's.
        dequantize: write quantized layers (a QLoRA base, say) as their dequantised fp32 weights instead of
            refusing them.
    Returns:
        The directory.
    Raises:
        ConfigError: the config cannot be expressed exactly in its family's config.json.
        TransformError: a transform that cannot be merged into plain weights (quantization, prefix tuning,
            ...), named; nothing is written then.
    """
    config = model.config
    family = family_for_config(config)
    reason = hf_configs.expressible(family.config_from_hf, family.config_to_hf, config)
    if reason is not None:
        raise ConfigError(f"cannot save as a {family.model_type} checkpoint: {reason}")
    target = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"), torch.float32)
    state = base_state_dict(model, dequantize=dequantize)  # LoRA / DoRA / IA3 merged in; a transform that cannot merge refuses here
    aliases = tied_aliases(model)
    tensors = {}
    for hf_name, (rule, ours) in family.hf_plan([n for n in state if n not in aliases]).items():
        tensor = rule.to_hf(tuple(state[name].detach().cpu() for name in ours))
        if rule.save_only:
            tensor = tensor.clone()  # safetensors refuses two names for one storage
        tensors[hf_name] = tensor.to(target) if target is not None else tensor
    hf_config = family.config_to_hf(config)
    stored = target or next(iter(tensors.values())).dtype
    hf_config["torch_dtype"] = hf_config["dtype"] = str(stored).removeprefix("torch.")
    return _write_checkpoint(Path(path), hf_config, _split_shards(tensors, parse_size(max_shard_size)))


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_checkpoint(directory: Path, hf_config: dict, shards: list[dict[str, torch.Tensor]]) -> Path:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    previous = _previous_weight_files(directory)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard, metadata)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
        write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(directory / CONFIG_FILE, hf_config)
    keep = set(names) | ({INDEX_FILE} if len(shards) > 1 else set())
    for name in previous - keep:  # the earlier save's files this one replaces; nothing else is touched
        (directory / name).unlink(missing_ok=True)
    return directory


def _previous_weight_files(directory: Path) -> set[str]:
    """The weight files an earlier save left: model.safetensors, or an index and the shards it names."""
    files = {SINGLE_FILE} if (directory / SINGLE_FILE).is_file() else set()
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = read_json(index).get("weight_map") or {}
        except CheckpointError:
            weight_map = {}
        files |= {INDEX_FILE} | {s for s in weight_map.values() if isinstance(s, str) and "/" not in s}
    return files
