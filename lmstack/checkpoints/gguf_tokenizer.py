"""The tokenizer, chat template and stop tokens embedded in a GGUF file, as tokenizer.json-shaped data.

``gguf_tokenizer_json`` returns the object a tokenizer.json would hold (``lmstack.tokenizers`` builds it,
``lmstack convert`` writes it), so GGUF tokenizers go through the same pipeline as every other:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from ``tokens`` and ``merges``; the pre-tokenizer is
  the one ``tokenizer.ggml.pre`` names (llama.cpp's table, as the published tokenizer.json files spell it).
- ``"llama"``: SentencePiece-style BPE with byte fallback, laid out as transformers' LlamaTokenizer; merges
  are derived from the pieces' scores as transformers derives them.

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens.
"""

from typing import Any

from lmstack.errors import CheckpointError
from lmstack.tokenizers.hf_json import bpe_model_json
from lmstack.tokenizers.pretokenize import CL100K_PATTERN, QWEN2_PATTERN

CONTROL, USER_DEFINED = 3, 4


def _byte_level(use_regex: bool = True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        _byte_level(use_regex=False)]}


_DIGITS_THEN_BYTES = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                             _byte_level()]}
# tokenizer.ggml.pre -> (normalizer, pre_tokenizer, ignore_merges), as each family's tokenizer.json has them
PRE_TOKENIZERS: dict[str, tuple[dict | None, dict, bool]] = {
    **{name: (None, _byte_level(), False) for name in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{name: (None, _split_then_bytes(CL100K_PATTERN), True) for name in ("llama3", "llama-v3", "llama-bpe")},
    **{name: ({"type": "NFC"}, _split_then_bytes(QWEN2_PATTERN), False) for name in ("qwen2", "stablelm2")},
    **{name: (None, _DIGITS_THEN_BYTES, False) for name in ("smollm", "starcoder", "refact", "command-r",
                                                             "codeshell")},
}


def gguf_tokenizer_json(metadata: dict[str, Any], source: str) -> dict[str, Any]:
    """The tokenizer.json object for the tokenizer in a GGUF file's metadata.

    Raises:
        CheckpointError: no tokenizer, an unknown tokenizer model or pre-tokenizer name, or malformed fields.
    """
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise CheckpointError(f"{source}: the GGUF file holds no tokenizer (tokenizer.ggml.model / tokens)")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "gpt2":
        data = _byte_level_bpe(metadata, tokens, source)
    elif model == "llama":
        data = _sentencepiece_bpe(metadata, tokens, types, source)
    else:
        raise CheckpointError(f"{source}: tokenizer model {model!r} is not supported (supported: gpt2, llama)")
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": kind == CONTROL}
                            for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    data["post_processor"] = _template(metadata, tokens)
    return {"version": "1.0", "truncation": None, "padding": None, **data}


def _byte_level_bpe(metadata: dict, tokens: list[str], source: str) -> dict:
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in PRE_TOKENIZERS:
        raise CheckpointError(f"{source}: tokenizer.ggml.pre {pre_name!r} names a pre-tokenizer lmstack does not "
                              f"know (known: {', '.join(sorted(PRE_TOKENIZERS))})")
    normalizer, pre, ignore_merges = PRE_TOKENIZERS[pre_name]
    merges = metadata.get("tokenizer.ggml.merges") or []
    return {"normalizer": normalizer, "pre_tokenizer": pre,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": bpe_model_json(_vocab(tokens), [m.split(" ") for m in merges], ignore_merges=ignore_merges)}


def _sentencepiece_bpe(metadata: dict, tokens: list[str], types: list[int], source: str) -> dict:
    """As transformers' LlamaTokenizer lays it out: "▁" for spaces and one before the text
    (Metaspace, prepend_scheme "first"), BPE with byte fallback, merges from the scores."""
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    return {"normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first" if prefix
                              else "never", "split": False},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])},
            "model": bpe_model_json(_vocab(tokens), score_merges(tokens, scores), fuse_unk=True, byte_fallback=True)}


def score_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """BPE merges from SentencePiece scores, as transformers' SentencePieceExtractor derives them: every
    split of a piece into two pieces is a merge, ranked by the merged piece's score (higher first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merged, score in dict(zip(tokens, scores)).items():
        local = [(merged[:k], merged[k:], score) for k in range(1, len(merged))
                 if merged[:k] in vocab and merged[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    # best score first, then longer left and right parts; stable for the rest (transformers' order)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[left, right] for left, right, _ in merges]


def _vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id; a token listed twice (rare: unused slots) keeps its last id, as transformers reads it."""
    return {token: i for i, token in enumerate(tokens)}


def _template(metadata: dict, tokens: list[str]) -> dict | None:
    """BOS / EOS around a sequence when the file says so (tokenizer.ggml.add_bos_token / add_eos_token)."""
    single, specials = [{"Sequence": {"id": "A", "type_id": 0}}], {}
    # SentencePiece vocabularies that do not say get BOS, as llama.cpp (and transformers) add it there.
    defaults = {"add_bos_token": metadata.get("tokenizer.ggml.model") == "llama", "add_eos_token": False}
    for flag, key, where in (("add_bos_token", "bos_token_id", 0), ("add_eos_token", "eos_token_id", None)):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if metadata.get(f"tokenizer.ggml.{flag}", defaults[flag]) and token_id is not None:
            token = tokens[token_id]
            item = {"SpecialToken": {"id": token, "type_id": 0}}
            single.insert(0, item) if where == 0 else single.append(item)
            specials[token] = {"id": token, "ids": [token_id], "tokens": [token]}
    if not specials:
        return None
    return {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": specials}


def gguf_stop_ids(metadata: dict[str, Any]) -> list[int]:
    """Token ids that end a turn: EOS and EOT / EOM as the file names them."""
    ids = [metadata.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))
