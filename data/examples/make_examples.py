"""Writes the small labelled example datasets shipped in this folder (seeded, so reruns give the same files).

    python data/examples/make_examples.py

sentiment_{train,test}.csv   columns text,label (positive / negative): short reviews built from templates;
                             the test split uses other templates, subjects and wordings than the training
                             split, so its accuracy measures what the encoder brings, not memorised phrases.
nli_{train,test}.csv         columns premise,hypothesis,label (entailment / contradiction): sentence pairs.
ner_{train,test}.jsonl       {"tokens": [...], "tags": [...]} with BIO tags for PER, LOC and ORG.
"""

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

POSITIVE = {"train": ["wonderful", "excellent", "delightful", "superb", "great", "lovely", "fantastic", "brilliant"],
            "test": ["amazing", "terrific", "charming", "outstanding", "enjoyable", "marvelous"]}
NEGATIVE = {"train": ["terrible", "awful", "boring", "dreadful", "horrible", "poor", "dull", "disappointing"],
            "test": ["miserable", "tedious", "lousy", "unpleasant", "mediocre", "painful"]}
SUBJECTS = {"train": ["the film", "this restaurant", "the hotel", "the concert", "this book", "the service"],
            "test": ["the museum", "this album", "the play", "the new phone", "our trip", "the coffee"]}
TEMPLATES = {"train": ["{s} was {w}.", "I thought {s} was {w}.", "Honestly, {s} is {w}!",
                       "What a {w} experience {s} turned out to be.", "My friends found {s} {w}."],
             "test": ["Overall {s} felt {w} to me.", "Everyone agreed that {s} was {w}.",
                      "I would call {s} simply {w}."]}

PEOPLE = {"train": [["Alice", "Johnson"], ["Bob"], ["Maria", "Garcia"], ["Chen", "Wei"], ["Omar"], ["Sarah", "Lee"]],
          "test": [["Priya", "Patel"], ["Lucas"], ["Emma", "Brown"], ["Yuki", "Tanaka"]]}
PLACES = {"train": [["Paris"], ["New", "York"], ["Berlin"], ["Cape", "Town"], ["Lima"], ["Oslo"]],
          "test": [["Madrid"], ["Buenos", "Aires"], ["Seoul"], ["Nairobi"]]}
ORGS = {"train": [["Acme", "Corp"], ["Globex"], ["the", "United", "Nations"], ["Initech"], ["Red", "Cross"]],
        "test": [["Umbrella", "Corporation"], ["Stark", "Industries"], ["Wayne", "Enterprises"]]}
NER_TEMPLATES = {"train": ["{PER} flew to {LOC} to meet {ORG} .", "{PER} works for {ORG} in {LOC} .",
                           "Yesterday {PER} visited {LOC} .", "{ORG} hired {PER} last year .",
                           "The office of {ORG} is in {LOC} ."],
                 "test": ["{PER} moved to {LOC} after joining {ORG} .", "In {LOC} , {PER} spoke about {ORG} ."]}


def sentiment(split: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice((POSITIVE if label == "positive" else NEGATIVE)[split])
        text = rng.choice(TEMPLATES[split]).format(s=rng.choice(SUBJECTS[split]), w=word)
        rows.append({"text": text[0].upper() + text[1:], "label": label})
    return rows


def nli(split: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        subject = rng.choice(SUBJECTS[split])
        good, bad = rng.choice(POSITIVE[split]), rng.choice(NEGATIVE[split])
        premise = f"Everyone said {subject} was {good}."
        label = "entailment" if i % 2 == 0 else "contradiction"
        hypothesis = f"People liked {subject}." if label == "entailment" else f"{subject.capitalize()} was {bad}."
        rows.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return rows


def ner(split: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for part in rng.choice(NER_TEMPLATES[split]).split():
            if part in ("{PER}", "{LOC}", "{ORG}"):
                kind = part[1:-1]
                words = rng.choice({"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}[kind][split])
                tokens += words
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
            else:
                tokens.append(part)
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(directory: Path = HERE) -> None:
    rng = random.Random(2026)
    for split, n in (("train", 400), ("test", 120)):
        write_csv(directory / f"sentiment_{split}.csv", sentiment(split, n, rng))
        write_csv(directory / f"nli_{split}.csv", nli(split, n // 2, rng))
        write_jsonl(directory / f"ner_{split}.jsonl", ner(split, n // 2, rng))


if __name__ == "__main__":
    main()
