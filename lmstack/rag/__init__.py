"""Retrieval: sentence embeddings, documents and chunking, vector indexes, BM25, a persistent store, hybrid
search, re-ranking and retrieval-augmented generation.

    from lmstack.rag import SentenceEncoder, Index, load_documents, answer
    encoder = SentenceEncoder("dir")
    index = Index.build("my-index", load_documents("notes/"), encoder, encoder_name="dir")
    index.search("question", k=5, mode="hybrid")
    answer("question", index, files)          # files: lmstack.checkpoints.model_files.open_model(...)
    answer("question", index, ServerChat("http://127.0.0.1:8000"))   # or a running lmstack serve
"""

from lmstack.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "embeddings": ["SentenceEncoder", "cosine_similarity_matrix", "pool"],
    "documents": ["Chunk", "Document", "chunk_documents", "load_documents"],
    "bm25": ["BM25", "tokenize"],
    "index": ["ExactIndex", "FaissIndex", "IVFIndex", "build_index", "kmeans", "train_centroids"],
    "store": ["ChunkStore"],
    "retrieve": ["Hit", "Index", "reciprocal_rank_fusion", "relative_score_fusion"],
    "rerank": ["CrossEncoder", "EmbeddingReranker"],
    "answering": ["Answer", "Citation", "answer", "build_prompt", "cited", "prompt_messages", "stream_answer"],
    "chat": ["LanguageModel", "LocalChat", "ServerChat", "as_chat"],
})
