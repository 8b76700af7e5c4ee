"""Adapter files in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``, both directions.

    save_adapter(model, "out/adapter")           # a directory peft loads onto the same base (its PeftModel)
    load_adapter(model, "peft_saved_adapter")    # applies LoRA / DoRA / IA3 to ``model`` and fills it in

Tensor keys are peft's: ``base_model.model.<Hugging Face module name>.<tensor>`` with ``<tensor>`` one of
``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), ``lora_magnitude_vector`` (out,) or ``ia3_l``. Module
names are translated by the model family's tensor rules (ours ``layers.0.attn.q_proj`` <-> Hugging Face's
``model.layers.0.self_attn.q_proj``); a module Hugging Face stores fused (GPT-2's ``c_attn``) has no
one-to-one name, and is refused.
"""

import os
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmstack.checkpoints.io import load_tensors, read_json, read_safetensors_header
from lmstack.errors import CheckpointError, ConfigError
from lmstack.fileio import atomic_path, write_json
from lmstack.models.registry import family_for_config
from lmstack.peft.apply import adapter_layers
from lmstack.peft.adapted import adapt_, linear_layers
from lmstack.peft.ia3 import IA3Layer
from lmstack.peft.lora import LoRALayer

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "ia3_l")


def module_names_to_hf(model: nn.Module) -> dict[str, str]:
    """Our linear-module name -> Hugging Face's, for every linear the family's rules rename one to one."""
    family = family_for_config(model.config)
    linears = list(linear_layers(model))
    plan = family.hf_plan([f"{name}.weight" for name in linears])
    return {ours[0].removesuffix(".weight"): hf_name.removesuffix(".weight")
            for hf_name, (rule, ours) in plan.items() if rule.is_rename and len(ours) == 1}


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s LoRA / DoRA or IA3 adapter (one method per file, as peft) to directory ``path``.

    Both files are written to temporary names and renamed only once both are complete, so a failed save
    leaves the previous adapter as it was.

    Raises:
        ConfigError: no adapter, two methods mixed, settings peft's files cannot state, or a layer with no
            one-to-one Hugging Face name.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ConfigError("the model carries no LoRA, DoRA or IA3 adapter to save")
    kinds = {LoRALayer if isinstance(layer, LoRALayer) else IA3Layer for layer in layers.values()}
    if len(kinds) > 1:
        raise ConfigError("the model mixes LoRA and IA3 adapters; peft's files hold one method each")
    to_hf = module_names_to_hf(model)
    unnamed = sorted(name for name in layers if name not in to_hf)
    if unnamed:
        raise ConfigError(f"{unnamed[:3]} have no one-to-one Hugging Face module name (a fused tensor there?); "
                          f"peft could not load such an adapter")
    tensors = {f"{PREFIX}{to_hf[name]}.{local}": tensor.detach().contiguous().cpu()
               for name, layer in layers.items() for local, tensor in layer.adapter_parameters().items()}
    config = _config(model, layers, to_hf, kinds.pop(), base_model_name_or_path)
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:  # both renamed at the end, only if both were written
        weights_tmp = stack.enter_context(atomic_path(directory / WEIGHTS_FILE))
        config_tmp = stack.enter_context(atomic_path(directory / CONFIG_FILE))
        save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        write_json(config_tmp, config)
    return directory


def _config(model: nn.Module, layers: dict, to_hf: dict[str, str], kind: type, base: str | None) -> dict:
    family = family_for_config(model.config)
    common = {"base_model_name_or_path": base, "fan_in_fan_out": False, "inference_mode": True,
              "modules_to_save": None, "revision": None, "task_type": "CAUSAL_LM" if _is_decoder(model) else None,
              "auto_mapping": {"base_model_class": family.architecture,
                               "parent_library": f"transformers.models.{family.model_type}.modeling_{family.model_type}"}}
    targets = _target_modules(set(layers), to_hf)
    if kind is IA3Layer:
        feedforward = _target_modules({n for n, layer in layers.items() if layer.feedforward}, to_hf)
        return {**common, "peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
                "init_ia3_weights": True}
    first = next(iter(layers.values()))
    settings = {(layer.alpha, layer.use_rslora, layer.use_dora, layer.lora_dropout.p if hasattr(layer.lora_dropout, "p")
                 else 0.0) for layer in layers.values()}
    if len(settings) > 1 and len({s[1:] for s in settings}) > 1:
        raise ConfigError("LoRA layers differ in rsLoRA, DoRA or dropout; peft's files hold one setting for all")
    ranks = {to_hf[name]: layer.rank for name, layer in layers.items() if layer.rank != first.rank}
    alphas = {to_hf[name]: layer.alpha for name, layer in layers.items() if layer.alpha != first.alpha}
    return {**common, "peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha,
            "lora_dropout": next(iter(settings))[3], "target_modules": targets, "use_dora": first.use_dora,
            "use_rslora": first.use_rslora, "bias": "none", "init_lora_weights": True, "lora_bias": False,
            "rank_pattern": {re.escape(k): v for k, v in ranks.items()},
            "alpha_pattern": {re.escape(k): v for k, v in alphas.items()}, "layers_to_transform": None,
            "layers_pattern": None, "exclude_modules": None}


def _is_decoder(model: nn.Module) -> bool:
    return hasattr(model, "lm_head") and not hasattr(model, "encoder")


def _target_modules(chosen: set[str], to_hf: dict[str, str]) -> list[str]:
    """peft's ``target_modules``: the short names (``q_proj``) when they pick exactly ``chosen``, else the full
    Hugging Face module names."""
    short = {to_hf[name].rsplit(".", 1)[-1] for name in chosen}
    picked = {ours for ours, hf in to_hf.items() if hf.rsplit(".", 1)[-1] in short}
    return sorted(short) if picked == chosen else sorted(to_hf[name] for name in chosen)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply the adapter saved in ``path`` (by lmstack or peft) to ``model`` in place; returns ``model``.

    Raises:
        CheckpointError: missing or unreadable files, a peft type other than LORA / IA3, tensors for modules
            this model lacks or of other shapes (an adapter for another base), settings lmstack cannot honour.
    """
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            raise CheckpointError(f"{file}: no such file (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_json(config_path)
    kind = config.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise CheckpointError(f"{config_path}: peft_type {kind!r}; lmstack loads LORA (and DoRA) and IA3 adapters")
    if config.get("fan_in_fan_out"):
        raise CheckpointError(f"{config_path}: fan_in_fan_out adapters (GPT-2's fused Conv1D) have no lmstack layer")
    unsupported = [key for key, plain in (("bias", "none"), ("lora_bias", False), ("modules_to_save", None),
                                          ("layers_to_transform", None), ("use_qalora", False))
                   if config.get(key, plain) not in (plain, None, [], False)]
    if unsupported:  # trained biases or whole modules saved beside the adapter: not loaded, so refused
        raise CheckpointError(f"{config_path}: {', '.join(f'{k}={config[k]!r}' for k in unsupported)} is not "
                              f"supported; lmstack loads the LoRA / DoRA / IA3 tensors alone")
    from_hf = {hf: ours for ours, hf in module_names_to_hf(model).items()}
    grouped = _grouped_tensors(weights_path, from_hf)
    if kind == "IA3":
        feedforward = config.get("feedforward_modules") or []
        for name, tensors in grouped.items():
            layer = adapt_(model.get_submodule(name), IA3Layer)
            layer.add_ia3(_named(from_hf, name, feedforward))
            _fill(layer, tensors, weights_path, name)
        return model
    for name, tensors in grouped.items():
        layer = model.get_submodule(name)
        if "lora_A.weight" not in tensors or "lora_B.weight" not in tensors:
            raise CheckpointError(f"{weights_path}: {name} lacks lora_A or lora_B")
        rank = tensors["lora_A.weight"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, from_hf, name, config.get("lora_alpha", 8))
        adapt_(layer, LoRALayer).add_lora(rank, float(alpha), float(config.get("lora_dropout") or 0.0),
                                          bool(config.get("use_rslora")), bool(config.get("use_dora")))
        _fill(layer, tensors, weights_path, name)
    return model


def _grouped_tensors(weights_path: Path, from_hf: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """Our module name -> {local tensor name: tensor}, every key checked to name a module of this model."""
    names = list(read_safetensors_header(weights_path))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    strangers = []
    for key, tensor in load_tensors(weights_path, names):
        local = next((t for t in _TENSORS if key.endswith("." + t)), None)
        module = key.removeprefix(PREFIX).removesuffix("." + local) if local else None
        if local is None or module not in from_hf:
            strangers.append(key)
            continue
        grouped.setdefault(from_hf[module], {})[local] = tensor
    if strangers:
        raise CheckpointError(f"{weights_path}: tensors {strangers[:3]} name no linear layer of this model "
                              f"(an adapter for another base?)")
    return grouped


def _fill(layer: nn.Module, tensors: dict[str, torch.Tensor], weights_path: Path, name: str) -> None:
    own = layer.adapter_parameters()
    for local, tensor in tensors.items():
        if local not in own:
            raise CheckpointError(f"{weights_path}: {name}.{local} does not belong to a {layer.transform_name} layer")
        if tuple(tensor.shape) != tuple(own[local].shape):
            raise CheckpointError(f"{weights_path}: {name}.{local} has shape {list(tensor.shape)}, this model's layer "
                                  f"needs {list(own[local].shape)} (an adapter for another base?)")
        with torch.no_grad():
            own[local].copy_(tensor)


def _named(from_hf: dict[str, str], ours: str, patterns: list[str] | str) -> bool:
    hf = next(h for h, o in from_hf.items() if o == ours)
    if isinstance(patterns, str):
        return re.fullmatch(patterns, hf) is not None
    return any(hf == p or hf.endswith("." + p) for p in patterns)


def _pattern_value(patterns: dict, from_hf: dict[str, str], ours: str, default):
    """peft's ``rank_pattern`` / ``alpha_pattern``: a key matches a module whose name ends with it (a regex)."""
    hf = next(h for h, o in from_hf.items() if o == ours)
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", hf):
            return value
    return default
