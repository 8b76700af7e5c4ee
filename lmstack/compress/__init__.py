"""Compression: quantization (int8, int4, NF4; GPTQ and AWQ as calibrated int4; int8 activations) as module swaps.

    from lmstack.compress import quantize_
    quantize_(model, "int4", group_size=128)
"""

from lmstack.compress.quantize import ALL_SCHEMES, quantization_targets, quantize_, quantized_bytes
from lmstack.compress.quantized_embedding import QuantizedEmbedding
from lmstack.compress.quantized_linear import SCHEMES, QuantizedLinear

__all__ = ["ALL_SCHEMES", "QuantizedEmbedding", "QuantizedLinear", "SCHEMES", "quantization_targets", "quantize_",
           "quantized_bytes"]
