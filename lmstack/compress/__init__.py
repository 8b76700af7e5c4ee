"""Compression: quantization (int8, int4, NF4; GPTQ and AWQ as calibrated int4; int8 activations) as module swaps,
pruning (magnitude, Wanda, SparseGPT, N:M; structured heads / channels / layers) and distillation.

    from lmstack.compress import quantize_, prune_, prune_structured
    quantize_(model, "int4", group_size=128)
    prune_(model, "wanda", 0.5, calibration=batches)
    small = prune_structured(model, heads=0.5, channels=0.5)

Names are imported on first use, so ``lmstack.compress.settings`` (a command's checks) loads without torch.
"""

from lmstack.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "quantize": ["ALL_SCHEMES", "quantization_targets", "quantize_", "quantized_bytes"],
    "quantized_embedding": ["QuantizedEmbedding"],
    "quantized_linear": ["SCHEMES", "QuantizedLinear"],
    "prune": ["GradualPruning", "keep_masks_", "masks_from_zeros", "prune_", "sparsity_report"],
    "structured": ["keep_layers", "prune_structured"],
    "distill": ["DistillObjective"],
})
