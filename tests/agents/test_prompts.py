"""Prompt templates, few-shot selection, chain of thought, answer extraction and self-consistency voting."""

import pytest

from lmstack.agents import (FixedExamples, NearestExamples, PromptTemplate, RandomExamples, chain_of_thought,
                            extract_answer, few_shot_prompt, self_consistency)
from lmstack.errors import ConfigError

EXAMPLES = [{"question": "Tom has 3 apples and buys 2 more. How many apples?", "answer": "5"},
            {"question": "A train travels 60 km in 1 hour. How far in 3 hours?", "answer": "180"},
            {"question": "Sara has 10 sweets and eats 4. How many are left?", "answer": "6"},
            {"question": "A car goes 50 km an hour. How far in 2 hours?", "answer": "100"}]


def test_template_checks_its_variables():
    t = PromptTemplate("Q: {question}\nContext: {context}\nA: {{literal}}")
    assert t.variables == ("question", "context")
    assert t.format(question="q", context="c") == "Q: q\nContext: c\nA: {literal}"
    with pytest.raises(ConfigError, match="needs context"):
        t.format(question="q")
    with pytest.raises(ConfigError, match="no variable extra"):
        t.format(question="q", context="c", extra=1)
    with pytest.raises(ConfigError, match="bad prompt template"):
        PromptTemplate("unclosed {brace")
    with pytest.raises(ConfigError, match="plain name"):
        PromptTemplate("{a.b}")


def test_few_shot_prompt_and_selectors(encoder):
    t = PromptTemplate("Q: {question}\nA:")
    prompt = few_shot_prompt(t, FixedExamples(EXAMPLES, 2).select("x"), {"question": "What is 2 + 2?"})
    assert prompt == ("Q: Tom has 3 apples and buys 2 more. How many apples?\nA: 5\n\n"
                      "Q: A train travels 60 km in 1 hour. How far in 3 hours?\nA: 180\n\nQ: What is 2 + 2?\nA:")
    draws = RandomExamples(EXAMPLES, 2, seed=1)
    first = [draws.select("q") for _ in range(3)]
    again = RandomExamples(EXAMPLES, 2, seed=1)
    assert first == [again.select("q") for _ in range(3)] and all(len(d) == 2 for d in first)
    nearest = NearestExamples(EXAMPLES, encoder, 2).select("A bus drives 40 km an hour. How far in 5 hours?")
    assert {e["answer"] for e in nearest} == {"180", "100"}  # the two distance problems
    with pytest.raises(ConfigError, match="cannot select 9"):
        NearestExamples(EXAMPLES, encoder, 9)


def test_chain_of_thought_and_extraction():
    assert chain_of_thought("Q: 2 + 2?\nA:") == "Q: 2 + 2?\nA: Let's think step by step."
    assert extract_answer("3 + 4 = 7, then 7 * 2 = 14. The answer is 14.") == "14"
    assert extract_answer("We get 1,250.0 in total") == "1250"
    assert extract_answer("Answer: 42 apples, not 41") == "42"
    assert extract_answer("#### -3") == "-3"
    assert extract_answer("no number at all") is None
    assert extract_answer("The answer is Paris.", numeric=False) == "Paris"


def test_self_consistency_majority_vote():
    paths = ["so the answer is 7", "the answer is 8", "I get 7", "no idea", "the answer is 8", "answer: 7"]
    vote = self_consistency(lambda i: paths[i], n=6)
    assert vote.answer == "7" and vote.votes == {"7": 3, "8": 2} and len(vote.completions) == 6
    tie = self_consistency(lambda i: ["8", "7", "7", "8"][i], n=4)
    assert tie.answer == "8"  # a tie goes to the answer reached first
    assert self_consistency(lambda i: "none", n=2).answer is None
