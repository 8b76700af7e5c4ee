"""Retrieval: sentence embeddings (a vector index, RAG and agents build on them).

    from lmstack.rag import SentenceEncoder
    vectors = SentenceEncoder("dir").encode(["first text", "second text"])   # (2, D)
"""

from lmstack.rag.embeddings import SentenceEncoder, cosine_similarity_matrix, pool

__all__ = ["SentenceEncoder", "cosine_similarity_matrix", "pool"]
