"""JSON mode's token mask equals xgrammar's (0.2.9, the reference REFERENCES.md names) at every step of random
walks: `compile_json_schema({"type": "object"}, strict_mode=False, max_whitespace_cnt=8)` over the same
vocabulary. xgrammar is installed with --no-deps in .venv/side/xgrammar by `make setup` (its pip
dependencies would pull triton); the test skips without it."""

import random
import sys
from pathlib import Path

import pytest
import torch

from lmstack.serve.json_mode import MAX_WHITESPACE, JSONObjectConstraint, JSONVocabulary

SIDE = Path(__file__).resolve().parents[2] / ".venv" / "side" / "xgrammar"
PIECES = list('{}[]":,0123456789-.eE+ \ntruefalsn\\u') + ['"a"', '": ', '", "', 'true', 'null', ' {"', '"}', '12',
                                                         '.5', 'ab', 'x\\n', 'é', '東京', '\t']


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


def test_json_object_mask_equals_xgrammars_at_every_step(xgr):
    eos = len(PIECES)
    vocab = JSONVocabulary(PIECES + [""], eos_ids=[eos])
    info = xgr.TokenizerInfo([t.encode() for t in PIECES] + [b"</s>"], xgr.VocabType.RAW, vocab_size=eos + 1,
                             stop_token_ids=[eos])
    grammar = xgr.GrammarCompiler(info).compile_json_schema({"type": "object"}, any_whitespace=True,
                                                            strict_mode=False, max_whitespace_cnt=MAX_WHITESPACE)
    rng, steps, finished = random.Random(0), 0, 0
    for _ in range(100):
        ours, theirs = JSONObjectConstraint(vocab), xgr.GrammarMatcher(grammar)
        bitmask, generated = xgr.allocate_token_bitmask(1, eos + 1), []
        for _ in range(50):
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
    assert steps > 1000 and finished > 30
