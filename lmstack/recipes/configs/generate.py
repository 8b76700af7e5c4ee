"""What `lmstack generate` takes."""

from dataclasses import dataclass
from pathlib import Path

from lmstack.config import field
from lmstack.recipes.configs.sampling import SamplingOptions


@dataclass(kw_only=True)
class GenerateJobConfig(SamplingOptions):
    """Generate text from a checkpoint: greedy, sampling (temperature / top-k / top-p) or beam search."""

    model: Path = field(help="checkpoint directory (config.json + *.safetensors), a .gguf file, or "
                             "smollm2-135m-instruct (the bundled package)")
    prompt: str | None = field(None, help="prompt text, encoded with the model's tokenizer")
    prompt_ids: str | None = field(None, help="prompt as token ids, e.g. '464 2068 7586'")
    num_beams: int = field(1, help="beam search with this many beams")
    stream: bool = field(False, help="print tokens as they are produced")
