"""`lmstack tokenizer train | encode | decode`: byte-level BPE from the command line."""

import glob
import json
import sys
from pathlib import Path

from tqdm import tqdm

from lmstack.errors import ConfigError
from lmstack.fileio import output_directory
from lmstack.tokenizers import load_tokenizer, train_bpe
from lmstack.tokenizers.pretokenize import PATTERNS
from lmstack.recipes.configs.tokenizer import DecodeConfig, EncodeConfig, TrainTokenizerConfig


def read_corpus(spec: str) -> list[str]:
    """The texts of every file matched by the comma-separated paths/globs in ``spec``."""
    files: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        matched = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matched:
            raise ConfigError(f"--input {part!r} matches no file")
        files += [Path(m) for m in matched]
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read {file}: {error}") from None
    return texts


def train_bpe_with_progress(texts: list[str], vocab_size: int, special_tokens: list[str], pattern: str):
    """``train_bpe`` under a progress bar of merges (a bad vocab_size or empty corpus is a TokenizerError)."""
    with tqdm(total=max(vocab_size - 256 - len(special_tokens), 0), desc="BPE merges", unit="merge") as bar:
        def progress(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        return train_bpe(texts, vocab_size, special_tokens=special_tokens, pattern=PATTERNS[pattern],
                         progress=progress)


def train(cfg: TrainTokenizerConfig) -> Path:
    output_directory(cfg.out, "--out")  # before training, not after
    texts = read_corpus(cfg.input)
    specials = [t.strip() for t in cfg.special_tokens.split(",") if t.strip()]
    tokenizer = train_bpe_with_progress(texts, cfg.vocab_size, specials, cfg.pattern)
    path = tokenizer.save(cfg.out)
    print(f"wrote {path} ({tokenizer.vocab_size} tokens, {len(tokenizer.merges)} merges, "
          f"{sum(len(t.encode()) for t in texts) / 1e6:.1f} MB of text)")
    return path


def encode(cfg: EncodeConfig) -> None:
    tokenizer = load_tokenizer(cfg.tokenizer)
    lines = [cfg.text] if cfg.text is not None else [line.rstrip("\n") for line in sys.stdin]
    for line in lines:
        print(json.dumps(tokenizer.encode(line, add_special_tokens=cfg.add_special_tokens)))


def decode(cfg: DecodeConfig) -> None:
    tokenizer = load_tokenizer(cfg.tokenizer)
    try:
        ids = [int(t) for t in cfg.ids.replace(",", " ").replace("[", " ").replace("]", " ").split()]
        print(tokenizer.decode(ids, skip_special_tokens=cfg.skip_special_tokens))
    except ValueError as error:
        raise ConfigError(f"--ids: {error}") from None
