"""Adapter files in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``, both directions.

    save_adapter(model, "out/adapter")           # a directory peft loads onto the same base (its PeftModel)
    load_adapter(model, "peft_saved_adapter")    # applies the saved method to ``model`` and fills it in

LoRA / DoRA / IA3 tensor keys are peft's: ``base_model.model.<Hugging Face module name>.<tensor>`` with
``<tensor>`` one of ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), ``lora_magnitude_vector`` (out,) or
``ia3_l``. Module names are translated by the model family's tensor rules (ours ``layers.0.attn.q_proj`` <->
Hugging Face's ``model.layers.0.self_attn.q_proj``); a module Hugging Face stores fused (GPT-2's ``c_attn``)
has no one-to-one name, and is refused. Prefix and prompt tuning save one tensor, ``prompt_embeddings``: the
prefix (P, L*2*Hkv*D) after its MLP, or the soft prompt (P, C). Bottleneck adapters, which peft lacks, are
written in the same two files with ``peft_type`` "BOTTLENECK" and lmstack's module names; only lmstack
reads them.
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
from lmstack.nn.transforms import added_tensor_names
from lmstack.peft.apply import adapter_layers, apply_bottleneck, apply_prefix_tuning, apply_prompt_tuning, remove_
from lmstack.peft.adapted import adapt_, linear_layers
from lmstack.peft.bottleneck import BottleneckLayer
from lmstack.peft.ia3 import IA3Layer
from lmstack.peft.lora import LoRALayer
from lmstack.peft.prefix import PrefixTuningModel
from lmstack.peft.prompt import PromptTuningModel

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"
_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "ia3_l")
_KINDS = {LoRALayer: "LORA", IA3Layer: "IA3", PrefixTuningModel: "PREFIX_TUNING", PromptTuningModel: "PROMPT_TUNING",
          BottleneckLayer: "BOTTLENECK"}


def tensor_names_to_hf(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Our tensor name -> Hugging Face's, for each of ``names`` the family's rules rename one to one."""
    plan = family_for_config(model.config).hf_plan(names)
    return {ours[0]: hf for hf, (rule, ours) in plan.items() if rule.is_rename and len(ours) == 1}


def module_names_to_hf(model: nn.Module) -> dict[str, str]:
    """Our linear-module name -> Hugging Face's, for every linear the family's rules rename one to one (by its
    ``weight``'s name, which a quantized linear also has in a Hugging Face file)."""
    names = tensor_names_to_hf(model, [f"{name}.weight" for name in linear_layers(model)])
    return {ours.removesuffix(".weight"): hf.removesuffix(".weight") for ours, hf in names.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapter (one method per file, as peft) to directory ``path``.

    Both files are written to temporary names and renamed only once both are complete, so a failed save
    leaves the previous adapter as it was.

    Raises:
        ConfigError: no adapter, two methods mixed, settings peft's files cannot state, or a layer with no
            one-to-one Hugging Face name.

    Parameters trained in full beside the adapter (a new task head) are saved too, as peft's
    ``modules_to_save``.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ConfigError("the model carries no PEFT adapter to save")
    kinds = {kind for layer in layers.values() for cls, kind in _KINDS.items() if isinstance(layer, cls)}
    if len(kinds) > 1:
        raise ConfigError(f"the model mixes {sorted(kinds)} adapters; an adapter file holds one method")
    kind = kinds.pop()
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING", "BOTTLENECK"):
        tensors, config = _other_files(model, layers, kind, base_model_name_or_path)
    else:
        tensors, config = _linear_files(model, layers, kind, base_model_name_or_path)
    saved, config["modules_to_save"] = _saved_modules(model, kind)  # a trained task head, say
    tensors.update(saved)
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


def _linear_files(model: nn.Module, layers: dict, kind: str, base: str | None) -> tuple[dict, dict]:
    """LoRA / DoRA / IA3: peft's tensors by Hugging Face module name, and the config."""
    to_hf = module_names_to_hf(model)
    unnamed = sorted(name for name in layers if name not in to_hf)
    if unnamed:
        raise ConfigError(f"{unnamed[:3]} have no one-to-one Hugging Face module name (a fused tensor there?); "
                          f"peft could not load such an adapter")
    tensors = {f"{PREFIX}{to_hf[name]}.{local}": tensor.detach().contiguous().cpu()
               for name, layer in layers.items() for local, tensor in layer.adapter_parameters().items()}
    return tensors, _config(model, layers, to_hf, IA3Layer if kind == "IA3" else LoRALayer, base)


def _other_files(model: nn.Module, layers: dict, kind: str, base: str | None) -> tuple[dict, dict]:
    """Prefix / prompt tuning (peft's one ``prompt_embeddings`` tensor) and bottleneck adapters (lmstack's)."""
    cfg = model.config
    common = {"base_model_name_or_path": base, "inference_mode": True, "modules_to_save": None, "revision": None,
              "auto_mapping": None, "task_type": _task_type(model), "peft_type": kind}
    if kind == "BOTTLENECK":
        first = next(iter(layers.values()))
        tensors = {f"{name}.{local}": t.detach().contiguous().cpu()
                   for name, layer in layers.items() for local, t in layer.adapter_parameters().items()}
        return tensors, {**common, "library": "lmstack", "target_modules": sorted(layers),
                         "adapter_size": first.adapter_down.out_features, "activation": first.adapter_activation}
    P = model.num_virtual_tokens
    shared = {**common, "num_virtual_tokens": P, "num_transformer_submodules": 1, "num_layers": cfg.n_layers}
    if kind == "PREFIX_TUNING":
        projection = model.prefix_encoder.projection
        with torch.no_grad():
            prefix = model.prefix_encoder()
        return {PROMPT_KEY: prefix.detach().contiguous().cpu()}, {
            **shared, "token_dim": model.prefix_kv_heads * model.prefix_head_dim,
            "num_attention_heads": model.prefix_kv_heads, "encoder_hidden_size": projection or cfg.dim,
            "prefix_projection": bool(projection), "init_weights": None}
    # The init method is history once trained; "RANDOM" keeps peft from loading a tokenizer to redo it.
    return {PROMPT_KEY: model.prompt_embeddings.weight.detach().contiguous().cpu()}, {
        **shared, "token_dim": cfg.dim, "num_attention_heads": cfg.n_heads, "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}


def _task_type(model: nn.Module) -> str | None:
    """peft's task type for this model (which PeftModel class it builds)."""
    if _is_decoder(model):
        return "CAUSAL_LM"
    return {"sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}.get(
        getattr(model.config, "head", None), "FEATURE_EXTRACTION")


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
    Modules saved whole beside it (peft's ``modules_to_save``: a trained classifier) are loaded and left
    trainable.

    Raises:
        CheckpointError: missing or unreadable files, an unknown peft type, tensors for modules this model
            lacks or of other shapes (an adapter for another base), settings lmstack cannot honour.
    """
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            raise CheckpointError(f"{file}: no such file (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_json(config_path)
    kind = config.get("peft_type")
    if kind not in _KINDS.values():
        raise CheckpointError(f"{config_path}: peft_type {kind!r}; lmstack loads {sorted(_KINDS.values())} adapters")
    tensors = dict(load_tensors(weights_path, list(read_safetensors_header(weights_path))))
    saved = _take_saved_modules(model, config, tensors, weights_path)  # checked before any change
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING"):
        _load_virtual(model, config, config_path, weights_path, tensors)
    elif kind == "BOTTLENECK":
        _load_bottleneck(model, config, config_path, weights_path, tensors)
    else:
        _load_linear(model, config, config_path, weights_path, tensors)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
            params[name].requires_grad_(True)
    return model


def _key_prefix(kind: str) -> str:
    """What peft puts before a Hugging Face tensor name: its tuner model's path to the base model."""
    return {"PREFIX_TUNING": "base_model.", "PROMPT_TUNING": "base_model.", "BOTTLENECK": ""}.get(kind, PREFIX)


def _is_adapter_key(kind: str, key: str) -> bool:
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING"):
        return key == PROMPT_KEY
    if kind == "BOTTLENECK":
        return ".adapter_down." in key or ".adapter_up." in key
    return any(key.endswith("." + t) for t in _TENSORS)


def _base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The base model's parameters by name: a transform's added ones left out, and so are a quantized
    layer's codes (buffers, which no task head has and no Hugging Face name maps)."""
    added = added_tensor_names(model)
    return {n: p for n, p in model.named_parameters() if n not in added}


def _saved_modules(model: nn.Module, kind: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """peft's ``modules_to_save``: the trainable parameters outside the adapter (a new task head), by file key,
    and the modules they belong to."""
    params = _base_parameters(model)
    trained = [n for n, p in params.items() if p.requires_grad]
    if not trained:
        return {}, None
    to_hf = {n: n for n in trained} if kind == "BOTTLENECK" else tensor_names_to_hf(model, trained)
    unnamed = [n for n in trained if n not in to_hf]
    if unnamed:
        raise ConfigError(f"trainable tensors {unnamed[:3]} have no one-to-one Hugging Face name; an adapter file "
                          f"cannot hold them")
    tensors = {_key_prefix(kind) + to_hf[n]: params[n].detach().contiguous().cpu() for n in trained}
    return tensors, sorted({to_hf[n].rsplit(".", 1)[0] for n in trained})


def _take_saved_modules(model: nn.Module, config: dict, tensors: dict, weights_path: Path) -> dict[str, torch.Tensor]:
    """Pop the ``modules_to_save`` tensors out of ``tensors``: our parameter name -> tensor, each checked."""
    kind, modules = config["peft_type"], config.get("modules_to_save") or []
    keys = [k for k in tensors if not _is_adapter_key(kind, k)]
    if not keys:
        return {}
    prefix = _key_prefix(kind)
    params = _base_parameters(model)
    from_hf = ({n: n for n in params} if kind == "BOTTLENECK"
               else {hf: ours for ours, hf in tensor_names_to_hf(model, list(params)).items()})
    saved, strangers = {}, []
    for key in keys:
        name = from_hf.get(key.removeprefix(prefix)) if key.startswith(prefix) else None
        module = key.removeprefix(prefix).rsplit(".", 1)[0]
        if name is None or name not in params or not any(module == m or module.endswith("." + m) or
                                                         module.startswith(m + ".") for m in modules):
            strangers.append(key)
        elif tuple(tensors[key].shape) != tuple(params[name].shape):
            raise CheckpointError(f"{weights_path}: {key} has shape {list(tensors[key].shape)}, this model's {name} "
                                  f"has {list(params[name].shape)} (another base, or another number of labels?)")
        else:
            saved[name] = tensors.pop(key)
    if strangers:
        raise CheckpointError(f"{weights_path}: tensors {strangers[:3]} name nothing of this model's {kind} adapter "
                              f"or its modules_to_save {modules} (an adapter for another base?)")
    return saved


def _load_linear(model: nn.Module, config: dict, config_path: Path, weights_path: Path, tensors: dict) -> None:
    """LoRA / DoRA / IA3 layers from peft's tensors."""
    kind = config["peft_type"]
    if config.get("fan_in_fan_out"):
        raise CheckpointError(f"{config_path}: fan_in_fan_out adapters (GPT-2's fused Conv1D) have no lmstack layer")
    unsupported = [key for key, plain in (("bias", "none"), ("lora_bias", False), ("layers_to_transform", None),
                                          ("use_qalora", False))
                   if config.get(key, plain) not in (plain, None, [], False)]
    if unsupported:  # trained biases beside the adapter: not loaded, so refused
        raise CheckpointError(f"{config_path}: {', '.join(f'{k}={config[k]!r}' for k in unsupported)} is not "
                              f"supported; lmstack loads the LoRA / DoRA / IA3 tensors alone")
    from_hf = {hf: ours for ours, hf in module_names_to_hf(model).items()}
    grouped = _grouped_tensors(weights_path, tensors, from_hf)
    if kind == "IA3":
        feedforward = config.get("feedforward_modules") or []
        for name, own in grouped.items():
            layer = adapt_(model.get_submodule(name), IA3Layer)
            layer.add_ia3(_named(from_hf, name, feedforward))
            _fill(layer, own, weights_path, name)
        return
    for name, own in grouped.items():
        layer = model.get_submodule(name)
        if "lora_A.weight" not in own or "lora_B.weight" not in own:
            raise CheckpointError(f"{weights_path}: {name} lacks lora_A or lora_B")
        rank = own["lora_A.weight"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, from_hf, name, config.get("lora_alpha", 8))
        adapt_(layer, LoRALayer).add_lora(rank, float(alpha), float(config.get("lora_dropout") or 0.0),
                                          bool(config.get("use_rslora")), bool(config.get("use_dora")))
        _fill(layer, own, weights_path, name)


def _load_virtual(model: nn.Module, config: dict, config_path: Path, weights_path: Path, tensors: dict) -> None:
    """Prefix or prompt tuning from its one tensor; a trained prefix MLP comes back as the plain table it made."""
    kind = config["peft_type"]
    if config.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(f"{config_path}: num_transformer_submodules={config['num_transformer_submodules']} "
                              f"(an encoder-decoder's prompt); lmstack loads decoder and encoder prompts")
    if set(tensors) != {PROMPT_KEY}:
        raise CheckpointError(f"{weights_path}: a {kind} adapter holds {PROMPT_KEY!r}, found {sorted(tensors)[:4]}")
    table = tensors[PROMPT_KEY]
    P = int(config.get("num_virtual_tokens") or table.shape[0])
    if kind == "PREFIX_TUNING":
        apply_prefix_tuning(model, P)
        own = model.prefix_encoder.embedding.weight
    else:
        apply_prompt_tuning(model, P)
        own = model.prompt_embeddings.weight
    if tuple(table.shape) != tuple(own.shape):
        remove_(model)  # nothing half-loaded stays behind
        raise CheckpointError(f"{weights_path}: {PROMPT_KEY} has shape {list(table.shape)}, this model's "
                              f"{kind.lower()} needs {list(own.shape)} (an adapter for another base?)")
    with torch.no_grad():
        own.copy_(table)


def _load_bottleneck(model: nn.Module, config: dict, config_path: Path, weights_path: Path, tensors: dict) -> None:
    """lmstack's bottleneck adapters: tensors by lmstack module name."""
    targets = config.get("target_modules")
    if config.get("library") != "lmstack" or not targets:
        raise CheckpointError(f"{config_path}: not an lmstack bottleneck adapter (library / target_modules missing)")
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise CheckpointError(f"{weights_path}: modules {missing[:3]} do not exist in this model (an adapter for "
                              f"another base?)")
    apply_bottleneck(model, int(config["adapter_size"]), config.get("activation", "relu"),
                     targets="|".join(re.escape(t) for t in targets))
    expected = {f"{name}.{local}": p for name in targets for local, p in modules[name].adapter_parameters().items()}
    problems = sorted(set(tensors) ^ set(expected)) or [k for k, t in tensors.items()
                                                        if tuple(t.shape) != tuple(expected[k].shape)]
    if problems:
        remove_(model)
        raise CheckpointError(f"{weights_path}: tensors {problems[:3]} are missing, extra or of other shapes "
                              f"(an adapter for another base?)")
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)


def _grouped_tensors(weights_path: Path, tensors: dict[str, torch.Tensor],
                     from_hf: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """Our module name -> {local tensor name: tensor}, every key checked to name a module of this model."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    strangers = []
    for key, tensor in tensors.items():
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
