"""A persistent, crash-safe chunk store: documents and metadata in SQLite, vectors in a flat float32 file.

    store = ChunkStore.create("my-index", encoder_name="all-minilm-l6-v2", fingerprint=[...], dim=384)
    store.add(chunks, vectors)            # whole documents at a time; a re-added document replaces its old chunks
    store.delete(["notes/a.md"])          # by document id
    store = ChunkStore.open("my-index")   # later, in another process
    store.live_rows(), store.vectors(rows), store.chunk(row)

Layout of the directory::

    store.sqlite        meta (encoder, dim, fingerprint, committed vector count, vector file) and chunks
    vectors-<gen>.f32   row r of the chunks table is bytes [r·dim·4, (r+1)·dim·4)

Why it survives a kill: vectors are appended and fsync'ed *before* the SQLite transaction that records them
commits, and nothing committed is ever rewritten in place. A run killed mid-way leaves either the old state
or the new one (bytes past the committed count are ignored, then overwritten by the next add). ``compact``
writes the surviving vectors to a new generation file and switches to it in one transaction.
"""

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import torch

from lmstack.errors import CheckpointError, ConfigError
from lmstack.rag.documents import Chunk

DATABASE = "store.sqlite"
FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks (row INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, idx INTEGER NOT NULL, text TEXT NOT NULL,
                     start INTEGER NOT NULL, end INTEGER NOT NULL, metadata TEXT NOT NULL, live INTEGER NOT NULL);
CREATE INDEX chunks_doc ON chunks (doc_id) WHERE live = 1;
"""


class ChunkStore:
    """One index directory. Open it with ``create`` or ``open``; the constructor is internal."""

    def __init__(self, directory: Path, db: sqlite3.Connection) -> None:
        self.directory, self.db = directory, db
        self.meta = dict(db.execute("SELECT key, value FROM meta"))
        self.dim = int(self.meta["dim"])

    # --- opening -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike, *, encoder_name: str, fingerprint: list[float],
               dim: int) -> "ChunkStore":
        """A new, empty store in ``directory`` (which must not hold one already)."""
        directory = Path(directory)
        if (directory / DATABASE).exists():
            raise ConfigError(f"{directory} already holds an index; add to it, or choose another --out")
        directory.mkdir(parents=True, exist_ok=True)
        temp = directory / f".{DATABASE}.tmp"
        temp.unlink(missing_ok=True)
        db = sqlite3.connect(temp)
        db.executescript(_SCHEMA)
        meta = {"format": FORMAT_VERSION, "encoder": encoder_name, "fingerprint": json.dumps(fingerprint),
                "dim": dim, "committed": 0, "vectors": "vectors-0.f32"}
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
        db.commit()
        db.close()
        (directory / "vectors-0.f32").touch()
        os.replace(temp, directory / DATABASE)  # the store exists only once it is complete
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ChunkStore":
        """An existing store.

        Raises:
            CheckpointError: no store there, a corrupted database, or a vector file shorter than recorded.
        """
        directory = Path(directory)
        path = directory / DATABASE
        if not path.is_file():
            raise CheckpointError(f"{directory}: not an lmstack index (no {DATABASE}); build one with "
                                  "`lmstack rag index DIR --out INDEX`")
        try:
            db = sqlite3.connect(path)
            db.execute("PRAGMA journal_mode=WAL")
            store = cls(directory, db)
        except (sqlite3.DatabaseError, KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: corrupted index database ({error}); rebuild the index") from None
        if int(store.meta["format"]) != FORMAT_VERSION:
            raise CheckpointError(f"{directory}: index format {store.meta['format']}, this lmstack reads "
                                  f"{FORMAT_VERSION}; rebuild the index")
        have = store.vector_path.stat().st_size if store.vector_path.is_file() else 0
        if have < store.committed * store.dim * 4:
            raise CheckpointError(f"{store.vector_path}: {have} bytes, but the index records {store.committed} "
                                  f"vectors of {store.dim} floats ({store.committed * store.dim * 4} bytes): the "
                                  "file was truncated or replaced; rebuild the index")
        return store

    def close(self) -> None:
        self.db.close()

    @property
    def committed(self) -> int:
        return int(self.meta["committed"])

    @property
    def vector_path(self) -> Path:
        return self.directory / self.meta["vectors"]

    @property
    def fingerprint(self) -> list[float]:
        return json.loads(self.meta["fingerprint"])

    # --- writing -------------------------------------------------------------------------------------------

    def add(self, chunks: list[Chunk], vectors: torch.Tensor) -> None:
        """Append ``chunks`` with their (len(chunks), dim) vectors in one transaction. Documents among them
        that the store already holds are replaced: their old chunks stop being live in the same commit."""
        if vectors.shape != (len(chunks), self.dim):
            raise ConfigError(f"{len(chunks)} chunks need ({len(chunks)}, {self.dim}) vectors, got "
                              f"{tuple(vectors.shape)}")
        start = self.committed
        with open(self.vector_path, "r+b") as f:  # past the committed rows: a killed run's leftovers go
            f.seek(start * self.dim * 4)
            f.write(vectors.float().contiguous().numpy().tobytes())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        rows = [(start + i, c.doc_id, c.index, c.text, c.start, c.end, json.dumps(c.metadata), 1)
                for i, c in enumerate(chunks)]
        with self.db:  # one transaction: all of it commits, or none
            self._retire(sorted({c.doc_id for c in chunks}))
            self.db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._set_meta(committed=start + len(chunks))

    def delete(self, doc_ids: list[str]) -> int:
        """Stop returning these documents' chunks; returns how many chunks that was."""
        with self.db:
            return self._retire(doc_ids)

    def _retire(self, doc_ids: list[str]) -> int:
        count = 0
        for doc_id in doc_ids:
            count += self.db.execute("UPDATE chunks SET live = 0 WHERE doc_id = ? AND live = 1", (doc_id,)).rowcount
        return count

    def compact(self) -> None:
        """Drop deleted chunks for good: the live vectors go to a new file, renumbered in one transaction."""
        live = self.live_rows()
        generation = int(self.meta["vectors"].removeprefix("vectors-").removesuffix(".f32")) + 1
        new = self.directory / f"vectors-{generation}.f32"
        with open(new, "wb") as f:
            f.write(self.vectors(live).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        old = self.vector_path
        with self.db:
            self.db.execute("DELETE FROM chunks WHERE live = 0")
            self.db.execute("UPDATE chunks SET row = -1 - row")  # two passes: new numbers never collide
            for new_row, old_row in enumerate(live):
                self.db.execute("UPDATE chunks SET row = ? WHERE row = ?", (new_row, -1 - old_row))
            self._set_meta(committed=len(live), vectors=new.name)
        old.unlink(missing_ok=True)

    def _set_meta(self, **values) -> None:
        for key, value in values.items():
            self.db.execute("UPDATE meta SET value = ? WHERE key = ?", (str(value), key))
            self.meta[key] = str(value)

    # --- reading -------------------------------------------------------------------------------------------

    def live_rows(self) -> list[int]:
        return [r for (r,) in self.db.execute("SELECT row FROM chunks WHERE live = 1 ORDER BY row")]

    def documents(self) -> list[str]:
        return [d for (d,) in self.db.execute("SELECT DISTINCT doc_id FROM chunks WHERE live = 1 ORDER BY doc_id")]

    def chunks(self, rows: list[int]) -> list[Chunk]:
        """The chunks stored at ``rows`` (in that order)."""
        found = {}
        for start in range(0, len(rows), 900):  # SQLite's bound-parameter limit
            part = rows[start:start + 900]
            query = f"SELECT row, doc_id, idx, text, start, end, metadata FROM chunks WHERE row IN ({','.join('?' * len(part))})"
            for row, doc_id, idx, text, begin, end, metadata in self.db.execute(query, part):
                found[row] = Chunk(doc_id, idx, text, begin, end, json.loads(metadata))
        return [found[r] for r in rows]

    def vectors(self, rows: list[int]) -> torch.Tensor:
        """(len(rows), dim) float32 vectors of ``rows``, read from the memory-mapped file."""
        if not self.committed or not rows:
            return torch.empty(0, self.dim)
        mapped = np.memmap(self.vector_path, dtype=np.float32, mode="r", shape=(self.committed, self.dim))
        return torch.from_numpy(np.ascontiguousarray(mapped[np.asarray(rows, dtype=np.int64)]))
