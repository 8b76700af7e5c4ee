"""Training data: documents from files, memory-mapped token shards, packed blocks with a resumable order."""

from lmstack.data.packing import PackedBlocks, eval_batches
from lmstack.data.shards import TokenShards, open_split, read_meta, shards_match, token_dtype, write_token_shards
from lmstack.data.sources import (SHAKESPEARE, Document, read_documents, resolve_sources, shakespeare_files,
                                  split_documents)

__all__ = ["Document", "PackedBlocks", "SHAKESPEARE", "TokenShards", "eval_batches", "open_split", "read_documents",
           "read_meta", "resolve_sources", "shakespeare_files", "split_documents", "token_dtype",
           "shards_match", "write_token_shards"]
