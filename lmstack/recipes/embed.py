"""`lmstack embed --model DIR "text" ...`: sentence embeddings, or their pairwise cosine similarities."""


from lmstack.rag import SentenceEncoder, cosine_similarity_matrix
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.embed import EmbedConfig


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
