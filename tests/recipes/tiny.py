"""The small decoder checkpoint recipe tests run on: tiny-llama (seed 0) with a 400-token BPE tokenizer."""

from pathlib import Path

from lmstack.checkpoints import save_hf
from lmstack.models import build_model
from lmstack.tokenizers import train_bpe
from tests.tokenizers.corpus import TRAIN


def tiny_llama_dir(directory: Path) -> Path:
    """Save tiny-llama and its tokenizer (``<|endoftext|>`` special) to ``directory``; returns it."""
    save_hf(build_model("tiny-llama", seed=0), directory)
    train_bpe(TRAIN, 400, special_tokens=["<|endoftext|>"]).save(directory)
    return directory
