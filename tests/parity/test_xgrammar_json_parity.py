"""JSON mode's token mask equals xgrammar's (0.2.9, the reference REFERENCES.md names) at every step of random
walks over the same vocabulary: `compile_json_schema({"type": "object"}, strict_mode=False,
max_whitespace_cnt=8)` for json_object mode, and schemas (required / optional properties in order, integers,
numbers, booleans, null, nested objects, arrays, string enums) with strict_mode=True. xgrammar is installed
with --no-deps in .venv/side/xgrammar by `make setup` (its pip dependencies would pull triton); the test
skips without it."""

import random
import sys
from pathlib import Path

import pytest
import torch

from lmstack.serve.json_mode import MAX_WHITESPACE, JSONObjectConstraint, JSONVocabulary
from lmstack.serve.json_schema import SchemaPrefix

SIDE = Path(__file__).resolve().parents[2] / ".venv" / "side" / "xgrammar"
PIECES = list('{}[]":,0123456789-.eE+ \ntruefalsn\\u') + ['"a"', '": ', '", "', 'true', 'null', ' {"', '"}', '12',
                                                         '.5', 'ab', 'x\\n', 'é', '東京', '\t', 'name', '"name"',
                                                         'age', '"age"', 'tags', 'red', '"red"', 'blue', 'ok', 'id']
PIECES += [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in PIECES]  # every key is reachable letter by letter


@pytest.fixture(scope="module")
def xgr():
    if not SIDE.is_dir():
        pytest.skip("xgrammar not installed: make setup puts it in .venv/side/xgrammar")
    sys.path.insert(0, str(SIDE))
    try:
        import xgrammar
    finally:
        sys.path.remove(str(SIDE))
    return xgrammar


SCHEMAS = [
    None,  # json_object mode: any object
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "number"}, "ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "blue"]}}},
     "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"name": {"type": ["string", "null"]}},
                                            "required": ["name"], "additionalProperties": False},
                                      "tags": {"type": "array", "items": {"type": "integer"}}},
     "required": ["a", "tags"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "flat", "optional-enum-array", "nested"])
def test_the_mask_equals_xgrammars_at_every_step(xgr, schema):
    eos = len(PIECES)
    vocab = JSONVocabulary(PIECES + [""], eos_ids=[eos])
    info = xgr.TokenizerInfo([t.encode() for t in PIECES] + [b"</s>"], xgr.VocabType.RAW, vocab_size=eos + 1,
                             stop_token_ids=[eos])
    grammar = xgr.GrammarCompiler(info).compile_json_schema(
        schema or {"type": "object"}, any_whitespace=True, strict_mode=schema is not None,
        max_whitespace_cnt=MAX_WHITESPACE)
    rng, steps, finished = random.Random(0), 0, 0
    for _ in range(100):
        ours = JSONObjectConstraint(vocab, SchemaPrefix(schema) if schema else None)
        theirs, bitmask, generated = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, eos + 1), []
        for _ in range(60):
            mask = ours(generated)
            theirs.fill_next_token_bitmask(bitmask)
            words = bitmask[0].tolist()  # token i is bit i % 32 of word i // 32
            expected = torch.tensor([(words[i // 32] >> (i % 32)) & 1 for i in range(eos + 1)], dtype=torch.bool)
            text = "".join(PIECES[t] for t in generated)
            assert torch.equal(mask, expected), (text, [PIECES[i] if i < eos else "EOS" for i in
                                                        (mask ^ expected).nonzero().flatten().tolist()])
            steps += 1
            generated.append(rng.choice(mask.nonzero().flatten().tolist()))
            assert theirs.accept_token(generated[-1])
            if generated[-1] == eos:
                finished += 1
                break
    assert steps > 1000 and finished > 15
