"""GGUF's quantized tensors loaded as they are: Q8_0, Q4_0 and Q4_1 straight into QuantizedLinear layers,
without an fp32 copy of the weights.

    model = load_gguf_quantized("SmolLM2-135M-Instruct.Q4_1.gguf")

The block formats map onto lmstack's with the same values bit for bit (tested against the fp32 import):

    Q8_0 (32 int8 codes, fp16 scale d):        int8, group 32:  w = q * d
    Q4_0 (32 4-bit codes u, fp16 d):           int4, group 32, zero 0:  w = (u - 8) * d
    Q4_1 (32 4-bit codes u, fp16 d, fp16 m):   int4, group 32, float mins:  w = u * d + m

The codes are repacked into lmstack's nibble order (element 2i low, 2i + 1 high, per row) and the llama q/k
rows un-permuted as the fp32 import does. The token embedding in one of these types stays quantized too
(a ``QuantizedEmbedding``; ``embedding=False`` dequantises it), and a tied output (no output.weight) reads
the same table, as llama.cpp does. Other types and 1-D tensors are dequantised to fp32.
"""

import os

import numpy as np
import torch
from torch import nn

from lmstack.checkpoints.gguf import GGUFFile, GGUFTensor, gguf_state_dict, gguf_tensor_plan, hf_config_from_gguf, \
    read_gguf
from lmstack.checkpoints.hf import tied_aliases
from lmstack.compress.formats import pack_nibbles
from lmstack.compress.quantized_embedding import QuantizedEmbedding
from lmstack.compress.quantized_linear import QuantizedLinear
from lmstack.errors import CheckpointError
from lmstack.models.registry import FAMILIES

KEPT = ("Q8_0", "Q4_0", "Q4_1")


def _fp16(column: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(column).view(np.float16).astype(np.float32))


def block_tensors(tensor: GGUFTensor) -> tuple[str, dict[str, torch.Tensor]]:
    """(scheme, QuantizedLinear tensors) for a 2-D Q8_0 / Q4_0 / Q4_1 tensor of shape (rows, cols)."""
    rows, cols = tensor.shape
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows * cols // 32, -1)
    scales = _fp16(blocks[:, :2]).reshape(rows, cols // 32)
    if tensor.kind == "Q8_0":
        codes = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).reshape(rows, cols)
        return "int8", {"qweight": codes, "scales": scales}
    packed = blocks[:, 2:] if tensor.kind == "Q4_0" else blocks[:, 4:]
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1)  # GGML: element j low, j + 16 high
    codes = torch.from_numpy(nibbles).reshape(rows, cols)
    out = {"qweight": pack_nibbles(codes, high_first=False), "scales": scales}
    if tensor.kind == "Q4_0":
        return "int4", {**out, "zeros": torch.zeros(rows, cols // 32, dtype=torch.int8)}
    return "int4", {**out, "mins": _fp16(blocks[:, 2:4]).reshape(rows, cols // 32)}


def load_gguf_quantized(path: "str | os.PathLike | GGUFFile", activations: str | None = None,
                        embedding: bool = True) -> nn.Module:
    """The model in a GGUF file with its Q8_0 / Q4_0 / Q4_1 linears kept quantized (CPU, eval mode).
    ``activations="int8"``: the kept layers round their inputs to int8 per block of 32 (dynamic quantization,
    as llama.cpp computes these types). ``embedding``: keep a Q8_0 / Q4_0 / Q4_1 token embedding quantized
    (a tied output shares it); False dequantises it to fp32.

    Raises:
        CheckpointError, ConfigError: as ``lmstack.checkpoints.gguf.load_gguf``.
    """
    file = path if isinstance(path, GGUFFile) else read_gguf(path)
    hf_config = hf_config_from_gguf(file)
    family = FAMILIES[hf_config["model_type"]]
    config = family.config_from_hf(hf_config)
    plan = gguf_tensor_plan(file, config)
    tied_head = "output.weight" not in file.tensors and getattr(config, "tie_embeddings", False)
    if tied_head:
        config = config.replace(tie_embeddings=False)
    model = family.build_empty(config)
    kept: dict[str, nn.Module] = {}  # module name -> QuantizedLinear or QuantizedEmbedding
    for name, targets in plan.items():
        tensor = file.tensors[name]
        ours = targets[0][0]
        if tensor.kind in KEPT and len(targets) == 1 and ours.endswith(".weight") and len(tensor.shape) == 2 \
                and ours != "embed_tokens.weight":
            kept[ours.removesuffix(".weight")] = _layer(model, ours, tensor, targets[0][1], activations)
    table = file.tensors["token_embd.weight"]
    if table.kind in KEPT and (embedding or tied_head):  # the embedding's codes, as a (vocab, dim) linear
        head = _layer(model, "lm_head.weight", table, lambda t: t, activations)
        if embedding:
            kept["embed_tokens"] = QuantizedEmbedding.from_table(head)
        if tied_head:
            kept["lm_head"] = head
    rest = GGUFFile(file.path, file.metadata, {n: t for n, t in file.tensors.items()
                                               if plan[n][0][0].removesuffix(".weight") not in kept})
    state = gguf_state_dict(rest, config)
    if tied_head and "lm_head" not in kept:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()
    for module_name, layer in kept.items():
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        for key, value in layer.state_dict().items():  # its codes; a bias comes from the file, with the norms
            state.setdefault(f"{module_name}.{key}", value)
    expected = set(model.state_dict()) - set(tied_aliases(model))
    if set(state) != expected:
        raise CheckpointError(f"{file.path}: tensors do not fill the model: missing {sorted(expected - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - expected)[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.quantization = {"scheme": "gguf", "group_size": 32, "activations": activations,
                          "embedding": "embed_tokens" in kept, "lm_head": "lm_head" in kept, "exclude": []}
    return model.eval()


def _layer(model: nn.Module, ours: str, tensor: GGUFTensor, fix, activations: str | None) -> QuantizedLinear:
    """A QuantizedLinear for linear ``ours`` (a weight name) from a block-quantized GGUF tensor."""
    linear = model.get_submodule(ours.removesuffix(".weight"))
    if not isinstance(linear, nn.Linear) or tuple(tensor.shape) != (linear.out_features, linear.in_features):
        raise CheckpointError(f"tensor {tensor.name!r} of shape {list(tensor.shape)} has no linear place {ours!r}")
    scheme, tensors = block_tensors(tensor)
    tensors = {k: fix(v).contiguous() for k, v in tensors.items()}  # llama q/k: un-permute rows of everything
    bias = torch.zeros(linear.out_features) if linear.bias is not None else None  # filled by the state dict
    return QuantizedLinear(linear.in_features, linear.out_features, scheme, tensors, bias, 32, activations)
