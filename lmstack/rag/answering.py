"""Retrieval-augmented generation: retrieve, fit the sources into the context, generate, cite.

    files = open_model("smollm2.gguf")                     # lmstack.checkpoints.model_files
    result = answer("How do I resume training?", index, files, k=4)
    result.text, result.citations[0].chunk.doc_id
    for piece in stream_answer(question, index, files):   # text pieces, then the final Answer
        ...

The prompt is the model's own chat template: a system message asking for an answer from the numbered
sources only, citing them as [1], [2], ...; then a user message with the sources and the question. Sources
are added best first, each only if the rendered prompt plus ``max_new_tokens`` still fits the model's
context (counted in the model's tokens, not guessed); those left out are reported. The answer's citations are the
[n] markers it wrote that point at a source it was shown.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

import regex
import torch

from lmstack.errors import DataError
from lmstack.generate import GenerationConfig, stream
from lmstack.rag.retrieve import Hit

SYSTEM = ("Answer the question using only the numbered sources below. Cite each fact with its source number in "
          "brackets, like [1]. If the sources do not contain the answer, say that you do not know.")
_CITATION = regex.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass(frozen=True)
class Citation:
    number: int  # the [n] in the answer
    hit: Hit

    @property
    def chunk(self):
        return self.hit.chunk


@dataclass
class Answer:
    """The generated text, the sources the prompt held (numbered from 1), those it cited, and those retrieved
    but left out for lack of context."""

    text: str
    sources: list[Hit]
    citations: list[Citation] = field(default_factory=list)
    left_out: list[Hit] = field(default_factory=list)
    prompt_tokens: int = 0


def render_sources(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{i}] ({h.chunk.doc_id}) {h.chunk.text.strip()}" for i, h in enumerate(hits, 1))


def prompt_ids(question: str, sources: list[Hit], files, system: str = SYSTEM) -> list[int]:
    """The token ids of the chat prompt holding ``sources`` (numbered from 1) and the question."""
    user = f"Sources:\n{render_sources(sources)}\n\nQuestion: {question}" if sources else f"Question: {question}"
    text = files.render_chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
    return files.tokenizer.encode(text, add_special_tokens=False)


def build_prompt(question: str, hits: list[Hit], files, max_new_tokens: int,
                 system: str = SYSTEM) -> tuple[list[int], list[Hit], list[Hit]]:
    """(prompt ids, sources used, sources left out): ``hits`` taken best first, each only if it still fits.

    Raises:
        DataError: the question alone (no sources) does not fit with ``max_new_tokens``.
    """
    limit = getattr(files.model.config, "context_limit", None) or files.model.config.max_seq_len
    budget = limit - max_new_tokens
    bare = len(prompt_ids(question, [], files, system))
    if bare > budget:
        raise DataError(f"the question takes {bare} tokens with the instructions; with max_new_tokens "
                        f"{max_new_tokens} that exceeds the model's context of {limit}")
    used: list[Hit] = []
    for hit in hits:
        if len(prompt_ids(question, [*used, hit], files, system)) <= budget:
            used.append(hit)
    return prompt_ids(question, used, files, system), used, [h for h in hits if h not in used]


def cited(text: str, sources: list[Hit]) -> list[Citation]:
    """The sources the answer cites by [n] (also [1, 2]), in order of first citation; other numbers ignored."""
    numbers = []
    for match in _CITATION.finditer(text):
        for part in match.group(1).split(","):
            n = int(part)
            if 1 <= n <= len(sources) and n not in numbers:
                numbers.append(n)
    return [Citation(n, sources[n - 1]) for n in numbers]


def stream_answer(question: str, index, files, *, k: int = 4, mode: str = "hybrid", where: dict | None = None,
                  max_new_tokens: int = 256, config: GenerationConfig | None = None,
                  system: str = SYSTEM, fusion: str = "relative", rerank=None
                  ) -> Iterator[str | Answer]:
    """Yield the answer's text as it is generated, then the finished :class:`Answer`. ``fusion`` and ``rerank``
    (a re-ranker) choose how sources are retrieved, as in ``Index.search``."""
    if files.tokenizer is None:
        raise DataError(f"{files.path}: RAG needs the model's tokenizer")
    hits = index.search(question, k=k, mode=mode, where=where, fusion=fusion, rerank=rerank)
    ids, used, left_out = build_prompt(question, hits, files, max_new_tokens, system)
    config = config or GenerationConfig(max_new_tokens=max_new_tokens)
    config = dataclasses.replace(config, max_new_tokens=max_new_tokens,
                                 eos_token_id=config.eos_token_id or files.stop_ids or None)
    pieces = []
    for piece in stream(files.model, torch.tensor([ids]), config, tokenizer=files.tokenizer,
                        skip_special_tokens=True):
        pieces.append(piece)
        yield piece
    text = "".join(pieces).strip()
    yield Answer(text, used, cited(text, used), left_out, len(ids))


def answer(question: str, index, files, **options) -> Answer:
    """:func:`stream_answer` run to the end: the finished :class:`Answer`."""
    *_, result = stream_answer(question, index, files, **options)
    return result
