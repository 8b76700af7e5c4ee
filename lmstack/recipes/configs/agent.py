"""What `lmstack agent` takes."""

from dataclasses import dataclass
from pathlib import Path

from lmstack.config import field
from lmstack.errors import ConfigError
from lmstack.recipes.configs.sampling import ChatModelOptions


@dataclass(kw_only=True)
class AgentConfig(ChatModelOptions):
    """Answer a question with a ReAct agent: the model thinks, calls tools and reads their results until it answers."""

    question: str = field(help="the question", positional=True)
    calculator: bool = field(True, help="give the agent the arithmetic calculator (parsed, never eval'ed)")
    files: Path | None = field(None, help="give it read-only access to the text files in this directory")
    index: Path | None = field(None, help="give it retrieval over this index (lmstack rag index)")
    k: int = field(3, help="chunks a retrieval call returns")
    encoder: str | None = field(None, help="override the encoder recorded in the index")
    max_steps: int = field(6, help="most model turns (thought + action)")
    max_new_tokens: int = field(160, help="most tokens in one turn")
    max_tokens: int = field(1024, help="most tokens generated in all")
    json: bool = field(False, help="print the trace as one JSON object instead of text")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.calculator or self.files or self.index):
            raise ConfigError("the agent has no tools: keep --calculator, or give --files DIR or --index INDEX")
        for flag, value in (("--k", self.k), ("--max-steps", self.max_steps), ("--max-new-tokens", self.max_new_tokens),
                            ("--max-tokens", self.max_tokens)):
            if value < 1:
                raise ConfigError(f"{flag} {value} must be at least 1")
