"""What `lmstack chat` takes."""

from dataclasses import dataclass
from pathlib import Path

from lmstack.config import field
from lmstack.recipes.configs.sampling import SamplingOptions


@dataclass(kw_only=True)
class ChatConfig(SamplingOptions):
    """Chat with an instruct model in the terminal, or answer one --message and exit."""

    model: Path = field(help="checkpoint directory, a .gguf file, or smollm2-135m-instruct (the bundled package)")
    message: str | None = field(None, help="answer this one message and exit (for scripts)")
    system: str | None = field(None, help="system message that opens the conversation")
    max_new_tokens: int = field(256, help="most tokens in one reply")
