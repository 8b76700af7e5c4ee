"""Text generation: greedy, sampling (temperature / top-k / top-p), beam search and streaming on a KV cache."""

from lmstack.generate.api import generate, stream, text_deltas
from lmstack.generate.config import GenerationConfig
from lmstack.generate.engine import CausalLMEngine
from lmstack.generate.processors import LogitsPipeline, repetition_penalty, top_k_filter, top_p_filter

__all__ = ["CausalLMEngine", "GenerationConfig", "LogitsPipeline", "generate", "repetition_penalty", "stream",
           "text_deltas", "top_k_filter", "top_p_filter"]
