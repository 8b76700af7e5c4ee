"""BERT against `transformers` on the same random weights: every head (BertModel, ...ForMaskedLM,
...ForNextSentencePrediction, ...ForPreTraining, ...ForSequenceClassification, ...ForTokenClassification),
padded batches with two segments, fp32 within 1e-4; and save_hf output loading back into transformers."""

import pytest
import torch

from lmstack.checkpoints import load_hf, save_hf
from lmstack.models.encoder import Encoder
from tests.parity.hf_reference import randomize_, transformers

ATOL = 1e-4
CLASSES = ["BertModel", "BertForMaskedLM", "BertForNextSentencePrediction", "BertForPreTraining",
           "BertForSequenceClassification", "BertForTokenClassification"]


def _config(**kw):
    base = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=40, type_vocab_size=2, num_labels=3)
    return transformers.BertConfig(**{**base, **kw})


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return ids, mask, types


def _pairs(cls, ref, out):
    """(reference, ours) output pairs of one head."""
    if cls == "BertModel":
        return [(ref.last_hidden_state, out.hidden_states), (ref.pooler_output, out.pooled)]
    if cls == "BertForPreTraining":
        return [(ref.prediction_logits, out.logits), (ref.seq_relationship_logits, out.nsp_logits)]
    if cls == "BertForNextSentencePrediction":
        return [(ref.logits, out.nsp_logits)]
    return [(ref.logits, out.logits)]


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token outputs at real positions only (padded positions are not compared)."""
    return x[mask.bool()] if x.dim() == 3 else x


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("cls", CLASSES)
def test_bert_heads_match_transformers(tmp_path, cls, act):
    torch.manual_seed(0)
    reference = randomize_(getattr(transformers, cls)(_config(hidden_act=act)).eval())
    reference.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert isinstance(model, Encoder)
    ids, mask, types = _batch()
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = model(ids, mask, types)
    for expected, got in _pairs(cls, ref, out):
        torch.testing.assert_close(_real(got, mask), _real(expected, mask), atol=ATOL, rtol=0)
    # padding really is masked: changing a padded token changes nothing at the real positions
    with torch.no_grad():
        ids2 = ids.clone()
        ids2[2, 5] = (ids2[2, 5] + 1) % 97
        again = model(ids2, mask, types)
    torch.testing.assert_close(_real(again.hidden_states, mask), _real(out.hidden_states, mask))
    save_hf(model, tmp_path / "ours")
    back = getattr(transformers, cls).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        ref_back = back(input_ids=ids, attention_mask=mask, token_type_ids=types)
    for expected, got in zip(ref_back.values(), ref.values()):
        torch.testing.assert_close(expected, got, atol=ATOL, rtol=0)


def test_classification_labels_round_trip(tmp_path):
    config = _config(id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert model.config.labels == ("neg", "neutral", "pos")
    save_hf(model, tmp_path / "ours")
    back = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    assert back.id2label == {0: "neg", 1: "neutral", 2: "pos"}


def test_untied_masked_lm_decoder(tmp_path):
    reference = randomize_(transformers.BertForMaskedLM(_config(tie_word_embeddings=False)).eval())
    reference.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert model.mlm_head.decoder.weight is not model.embed_tokens.weight
    ids, mask, types = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types).logits[mask.bool()],
                                   reference(input_ids=ids, attention_mask=mask,
                                             token_type_ids=types).logits[mask.bool()], atol=ATOL, rtol=0)
