"""Quantized checkpoints: a Hugging Face-style directory whose linears hold packed low-bit tensors.

    save_quantized(model, "runs/q")        # config.json (+ quantization_config) and model.safetensors
    model = load_quantized("runs/q")       # the same modules and tensors, bit for bit

``config.json`` is the family's Hugging Face config with one more key (documented in docs/quantization.md):

    "quantization_config": {"quant_method": "lmstack", "scheme": "int4", "group_size": 128, "lm_head": true,
                            "activations": null,
                            "modules": {"layers.0.attn.q_proj": {"scheme": "int4", "group_size": 128}, ...}}

(``scheme`` / ``group_size`` at the top say what was asked for; each module records its own, since a GGUF
file loaded as is mixes them, e.g. Q8_0 head and Q4_0 blocks.) A quantized token embedding is listed with
``"embedding": true``; a head that reads the embedding's table (tied) with ``"shares": "embed_tokens"`` and
no tensors of its own in the file.

``model.safetensors`` holds lmstack's own tensor names: for a quantized linear ``NAME.qweight``,
``NAME.scales``, ... (the tensors of ``lmstack.compress.formats``) and ``NAME.bias``; every other tensor
as the model's state dict names it. transformers cannot read this format; ``lmstack convert`` of a
dequantized copy can (``dequantize_model``).
"""

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from lmstack.checkpoints import load_model
from lmstack.checkpoints.hf import tied_aliases
from lmstack.checkpoints.io import load_tensors, read_json, write_json, write_safetensors
from lmstack.compress.quantized_embedding import QuantizedEmbedding
from lmstack.compress.quantized_linear import QuantizedLinear
from lmstack.errors import CheckpointError, ConfigError
from lmstack.models.registry import family_for_config, family_for_hf_config

QUANT_METHOD = "lmstack"
WEIGHTS = "model.safetensors"


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json carries lmstack's quantization_config."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    quant = read_json(config).get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (quantized by ``quantize_``) to directory ``path``; weights first, config.json last,
    each file atomically, so an interrupted save never leaves a loadable half."""
    modules = module_records(model)
    if not modules:
        raise ConfigError("the model holds no quantized layer: use save_hf for a plain model")
    record = getattr(model, "quantization", {})
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    family = family_for_config(model.config)
    write_safetensors(directory / WEIGHTS, _untied(model.state_dict()), metadata={"format": "pt"})
    hf_config = family.config_to_hf(model.config)
    first = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    hf_config["quantization_config"] = {"quant_method": QUANT_METHOD, "scheme": record.get("scheme", first.scheme),
                                        "group_size": record.get("group_size", first.group_size),
                                        "activations": record.get("activations", first.activations),
                                        "lm_head": "lm_head" in modules,
                                        "modules": modules}
    write_json(directory / "config.json", hf_config)
    return directory


def module_records(model: nn.Module) -> dict[str, dict]:
    """quantization_config.modules: each quantized module's scheme, group size and options."""
    tables = {m.qweight.data_ptr(): name for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}
    records = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedEmbedding):
            records[name] = {"scheme": m.scheme, "group_size": m.group_size, "embedding": True}
        elif isinstance(m, QuantizedLinear):
            records[name] = {"scheme": m.scheme, "group_size": m.group_size}
            if m.activations:
                records[name]["activations"] = m.activations
            if m.qweight.data_ptr() in tables:
                records[name]["shares"] = tables[m.qweight.data_ptr()]
    return dict(sorted(records.items(), key=lambda item: not item[1].get("embedding")))  # tables first


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (safetensors refuses aliases)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape)
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """The quantized model saved in ``path``, in eval mode, on CPU.

    Raises:
        CheckpointError: missing files, a module list that does not match the model, tensors that are
            missing, unexpected or of the wrong shape for their scheme.
    """
    directory = Path(path)
    hf_config = read_json(directory / "config.json")
    quant = hf_config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{directory}: config.json has no lmstack quantization_config")
    family = family_for_hf_config(hf_config)
    config = family.config_from_hf(hf_config)
    modules = quant.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{directory}/config.json: quantization_config.modules must list the quantized layers")
    if quant.get("lm_head") and getattr(config, "tie_embeddings", False):
        config = dataclasses.replace(config, tie_embeddings=False)
    model = family.build_empty(config)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS} is missing")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
    state = dict(load_tensors(weights, names))
    for name, entry in sorted(modules.items(), key=lambda item: not (isinstance(item[1], dict)
                                                                     and item[1].get("embedding"))):
        if not isinstance(entry, dict) or "scheme" not in entry:
            raise CheckpointError(f"{directory}/config.json: quantization_config.modules[{name!r}] must be "
                                  '{"scheme": ..., "group_size": ...}')
        _swap_in(model, name, entry, state, directory)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    tied = set(tied_aliases(model))
    missing -= tied
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors do not match the quantized model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    for alias, source in tied_aliases(model).items():
        state[alias] = state[source]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{weights}: {str(error).splitlines()[0]}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.quantization = {"scheme": quant.get("scheme"), "group_size": quant.get("group_size"),
                          "activations": quant.get("activations"),
                          "embedding": any(isinstance(e, dict) and e.get("embedding") for e in modules.values()),
                          "lm_head": bool(quant.get("lm_head")), "exclude": []}
    return model.eval()


def _swap_in(model: nn.Module, name: str, entry: dict, state: dict, directory: Path) -> None:
    """Replace linear ``name`` by a QuantizedLinear holding its stored tensors (``entry``: the module's
    quantization_config record), checking their shapes."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{directory}: quantized module {name!r} does not exist in this model") from None
    kind = nn.Embedding if entry.get("embedding") else nn.Linear
    if not isinstance(linear, kind):
        raise CheckpointError(f"{directory}: quantized module {name!r} is a {type(linear).__name__}, not "
                              f"{'an embedding' if kind is nn.Embedding else 'a linear'}")
    prefix = f"{name}."
    tensors = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix) and k != f"{name}.bias"}
    bias = state.pop(f"{name}.bias", None)
    try:
        if kind is nn.Embedding:
            quantized = QuantizedEmbedding(linear.num_embeddings, linear.embedding_dim, entry["scheme"], tensors,
                                           entry.get("group_size"))
            quantized.as_table().check_tensors()
        elif "shares" in entry:
            quantized = _shared_table(model, name, entry, tensors, linear)
        else:
            quantized = QuantizedLinear(linear.in_features, linear.out_features, entry["scheme"], tensors, bias,
                                        entry.get("group_size"), entry.get("activations"))
            quantized.check_tensors()
    except (ConfigError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{directory}: {name}: {error}") from None
    if (bias is None) != (getattr(linear, "bias", None) is None):
        raise CheckpointError(f"{directory}: {name}: the bias is {'missing' if bias is None else 'unexpected'}")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, quantized)
    for key, value in quantized.state_dict().items():
        state[prefix + key] = value


def _shared_table(model: nn.Module, name: str, entry: dict, tensors: dict, linear: nn.Linear) -> QuantizedLinear:
    """The head of a tied model: a QuantizedLinear over the quantized embedding's own tensors."""
    table = model.get_submodule(entry["shares"]) if isinstance(entry["shares"], str) else None
    if not isinstance(table, QuantizedEmbedding):
        raise ValueError(f"shares {entry['shares']!r}, which is not a quantized embedding of this checkpoint")
    if tensors:
        raise ValueError(f"shares {entry['shares']!r} but the file holds tensors of its own: {sorted(tensors)}")
    if (linear.in_features, linear.out_features) != (table.embedding_dim, table.num_embeddings):
        raise ValueError(f"shares {entry['shares']!r} of shape {[table.num_embeddings, table.embedding_dim]}, "
                         f"expected {[linear.out_features, linear.in_features]}")
    return table.as_table(entry.get("activations"))


def load_any_model(path: str | os.PathLike, **options) -> nn.Module:
    """A quantized directory through ``load_quantized`` (CPU, as saved), anything else through
    ``lmstack.checkpoints.load_model(path, **options)``."""
    if is_quantized_checkpoint(path):
        return load_quantized(path)
    return load_model(path, **options)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear by an nn.Linear holding its dequantised weight, and a QuantizedEmbedding
    by an nn.Embedding (in place). A head that shared the embedding's table is tied to it again."""
    shared = {name for name, entry in module_records(model).items() if "shares" in entry}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            replacement = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                scale = module.input_scale if "input_scale" in module._buffers else None
                weight = module.dequantize()
                replacement.weight.copy_(weight * scale if scale is not None else weight)
                if module.bias is not None:
                    replacement.bias.copy_(module.bias)
        elif isinstance(module, QuantizedEmbedding):
            replacement = nn.Embedding(module.num_embeddings, module.embedding_dim)
            with torch.no_grad():
                replacement.weight.copy_(module.dequantize())
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    if shared == {"lm_head"} and hasattr(model, "tie_weights"):
        model.config = dataclasses.replace(model.config, tie_embeddings=True)
        model.tie_weights()
    if hasattr(model, "quantization"):
        del model.quantization
    return model
