"""Re-rankers: a cross-encoder's scores equal sentence-transformers' CrossEncoder.predict on the same
weights (random-init BertForSequenceClassification, pairs long enough to be truncated); re-ranked search
returns the first stage's candidates in the re-ranker's order."""

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.rag import CrossEncoder, EmbeddingReranker, Index, load_documents
from lmstack.recipes.bundled import resolve_model_dir

PAIRS = [("how are you", "I am fine, thanks."), ("what is lora?", "LoRA trains small matrices. " * 30),
         ("pasta", "Boil the pasta in salted water for nine minutes.")]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory, encoder):
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("cross-encoder")
    source = resolve_model_dir("all-minilm-l6-v2")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(source)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=1)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # spread the scores: BERT's init (std 0.02) scores every pair nearly alike
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                parameter.normal_(std=0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_cross_encoder_equals_sentence_transformers(cross_encoder_dir):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.CrossEncoder(str(cross_encoder_dir), device="cpu")
    expected = torch.from_numpy(reference.predict(PAIRS, batch_size=2)).float()
    ours = CrossEncoder(cross_encoder_dir)
    assert ours.max_length == reference.max_seq_length == 64
    got = torch.cat([ours.score(q, [p]) for q, p in PAIRS])
    assert expected.std() > 0.01
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.score("what is lora?", [p for _, p in PAIRS], batch_size=2),
                               torch.from_numpy(reference.predict([("what is lora?", p) for _, p in PAIRS])).float(),
                               atol=1e-5, rtol=0)


def test_reranked_search_orders_by_the_reranker(tmp_path, docs_dir, encoder, cross_encoder_dir):
    index = Index.build(tmp_path / "index", load_documents(docs_dir), encoder, encoder_name="e", size=32,
                        overlap=8)
    first_stage = index.search("checkpoint training resume", k=50, mode="bm25")
    reranker = CrossEncoder(cross_encoder_dir)
    hits = index.search("checkpoint training resume", k=2, mode="bm25", rerank=reranker)
    scores = reranker.score("checkpoint training resume", [h.chunk.text for h in first_stage])
    best = scores.argsort(descending=True, stable=True)[:2].tolist()
    assert [h.chunk.id for h in hits] == [first_stage[i].chunk.id for i in best]
    assert [h.score for h in hits] == pytest.approx(scores[best].tolist())
    assert [h.rank for h in hits] == [1, 2]
    # the embedding re-ranker scores BM25's candidates by cosine: the dense ranking restricted to them
    cosine = index.search("how do I resume training?", k=2, mode="bm25", rerank=EmbeddingReranker(encoder))
    dense = [h for h in index.search("how do I resume training?", k=50) if h.chunk.id in
             {h.chunk.id for h in index.search("how do I resume training?", k=50, mode="bm25")}]
    assert [h.chunk.id for h in cosine] == [h.chunk.id for h in dense[:2]]
    assert [h.score for h in cosine] == pytest.approx([h.score for h in dense[:2]], abs=1e-5)


def test_a_bi_encoder_is_not_a_cross_encoder():
    with pytest.raises(ConfigError, match="sequence-classification checkpoint"):
        CrossEncoder(resolve_model_dir("all-minilm-l6-v2"))
