"""`lmstack embed --model DIR "text" ...`: sentence embeddings, or their pairwise cosine similarities."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import field
from lmstack.rag import SentenceEncoder, cosine_similarity_matrix
from lmstack.recipes.bundled import resolve_model_dir


@dataclass
class EmbedConfig:
    """Embed texts with an encoder checkpoint (e.g. all-MiniLM-L6-v2) and print vectors or similarities."""

    texts: list[str] = field(help="texts to embed", positional=True)
    model: Path = field(help="encoder checkpoint directory (config.json, safetensors, vocab), or "
                        "all-minilm-l6-v2 (the bundled package)")
    output: Literal["similarity", "vectors"] = field("similarity", help="what to print")
    pooling: Literal["auto", "mean", "cls", "max"] = field("auto", help="pooling; auto reads the checkpoint's")
    batch_size: int = field(32, help="texts per forward pass")
    device: str = field("cpu", help="cpu, cuda, ...")


def run(cfg: EmbedConfig):
    encoder = SentenceEncoder(resolve_model_dir(cfg.model), device=cfg.device, pooling=None if cfg.pooling == "auto" else cfg.pooling)
    vectors = encoder.encode(cfg.texts, batch_size=cfg.batch_size)
    if cfg.output == "vectors":
        for text, vector in zip(cfg.texts, vectors):
            print(f"{_short(text)}\t" + " ".join(f"{x:.6f}" for x in vector.tolist()))
        return vectors
    sims = cosine_similarity_matrix(vectors, vectors)
    width = max(len(_short(t)) for t in cfg.texts)
    print(" " * width + "  " + " ".join(f"{i:>6}" for i in range(len(cfg.texts))))
    for i, text in enumerate(cfg.texts):
        print(f"{_short(text):<{width}}  " + " ".join(f"{x:6.3f}" for x in sims[i].tolist()) + f"   [{i}]")
    return sims


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"
