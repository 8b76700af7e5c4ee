"""Serving: a continuous-batching engine over a paged KV cache, and the OpenAI-compatible API over it.

    from lmstack.serve import Engine, SamplingParams
    engine = Engine(model, num_blocks=512, block_size=16)
    engine.add(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    engine.run_to_completion()            # or step() in a loop; `lmstack serve` runs it behind HTTP
"""

from lmstack.serve.paged_kv import BlockAllocator, PackedBatch, PagedKVPool
from lmstack.serve.sampling import SamplingParams
from lmstack.serve.scheduler import Engine, StepOutput

__all__ = ["BlockAllocator", "Engine", "PackedBatch", "PagedKVPool", "SamplingParams", "StepOutput"]
