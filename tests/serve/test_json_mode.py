"""JSON-object constrained decoding: the automaton accepts exactly the prefixes of JSON objects, the token
mask equals simulating every token, and every reply that ends is an object json.loads reads."""

import json
import random

import pytest

from lmstack.serve.json_mode import MAX_WHITESPACE, JSONObjectConstraint, JSONPrefix, JSONVocabulary

GOOD = ['{}', '{"a": 1}', '{"a": [1, 2.5e-3, -0, 1E+9, true, false, null, {"b": "x\\n\\u00e9\\"\\\\"}]}',
        '{ "k" : -0.5 } ', '{"a":[]}', '{"a":{}}', '{"\\u00e9": "é 東京"}', '{"a": [[], [{}]]}']
BAD = ['[]', '1', '"x"', '{"a" 1}', '{"a": 01}', '{"a": tru }', '{"a": 1,}', '{a: 1}', '{"a": "\x01"}', '{} x',
       '{"a": -}', '{"a": 1.}', '{"a": [1,]}', '{"\\u00e9"}', '{"a": "\\x"}', '{"a": 1e}', '{"a": .5}', '{"a"}',
       '{"a": [}', '{"a": 1]}', '{,}', '{"a": "\\u12g4"}']


@pytest.mark.parametrize("text", GOOD)
def test_json_objects_are_complete(text):
    state = JSONPrefix()
    assert state.feed(text) and state.complete
    json.loads(text)
    for cut in range(len(text.rstrip())):  # every proper prefix is a prefix, not yet complete
        partial = JSONPrefix()
        assert partial.feed(text[:cut]) and not partial.complete


@pytest.mark.parametrize("text", BAD)
def test_other_texts_are_refused(text):
    state = JSONPrefix()
    assert not (state.feed(text) and state.complete)
    with pytest.raises(json.JSONDecodeError if text not in ("1", '"x"', "[]") else AssertionError):
        assert isinstance(json.loads(text), dict)


def test_a_refused_feed_leaves_the_state_unchanged():
    state = JSONPrefix()
    assert state.feed('{"a": ')
    assert not state.feed("}")
    assert state.feed("1}") and state.complete


def test_whitespace_runs_are_capped_and_the_reply_opens_with_the_object():
    assert not JSONPrefix().feed(" ")  # as xgrammar's JSON grammar: no whitespace before the root object
    state = JSONPrefix()
    assert state.feed("{" + " " * MAX_WHITESPACE)
    assert not state.feed(" ")
    assert state.feed('"a": 1}')


PIECES = list('{}[]":,0123456789-.eE+ \ntruefalsn\\u') + ['"a"', '": ', '", "', 'true', 'null', ' {"', '"}', '12',
                                                         '.5', 'ab', 'x\\n', '\ufffd', 'é']


@pytest.fixture(scope="module")
def vocabulary():
    return JSONVocabulary(PIECES + [""], eos_ids=[len(PIECES)])


def test_the_mask_equals_simulating_every_token_and_replies_parse(vocabulary):
    eos, rng, finished = len(PIECES), random.Random(0), 0
    for _ in range(200):
        constraint, generated = JSONObjectConstraint(vocabulary), []
        for _ in range(60):
            mask = constraint(generated)
            for i, text in enumerate(vocabulary.texts):
                if i == eos:
                    expected = constraint.state.complete
                else:
                    usable = text != "" and "\ufffd" not in text
                    expected = usable and not constraint.state.complete and constraint.state.copy().feed(text)
                assert bool(mask[i]) == expected, (text, "".join(vocabulary.texts[t] for t in generated))
            generated.append(rng.choice(mask.nonzero().flatten().tolist()))
            if generated[-1] == eos:
                break
        if generated[-1] == eos:
            finished += 1
            assert isinstance(json.loads("".join(vocabulary.texts[t] for t in generated[:-1])), dict)
    assert finished > 100


def test_a_token_outside_the_mask_is_a_bug_not_a_silent_reply(vocabulary):
    constraint = JSONObjectConstraint(vocabulary)
    with pytest.raises(AssertionError, match="outside the JSON mask"):
        constraint([PIECES.index("}")])  # "}" cannot open the reply
