"""Prefix tuning and prompt tuning against peft 0.21.2 (REFERENCES.md section 1): adapter files both ways,
logits, gradients of the learned tensors, and greedy decoding through the KV cache; prompt tuning on a
BERT sequence classifier too (peft pools the first virtual token)."""

import pytest
import torch

from lmstack.checkpoints import load_hf
from lmstack.generate import GenerationConfig, generate
from lmstack.peft import apply_prefix_tuning, load_adapter, save_adapter

from tests.parity.hf_reference import hf_logits, load_reference, randomize_, tiny_gqa_llama_dir

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

P = 5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_gqa_llama_dir(tmp_path_factory)


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _peft_model(base_dir, method: str, projection: int | None = None):
    torch.manual_seed(3)
    if method == "prefix":
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                         prefix_projection=projection is not None, encoder_hidden_size=projection or 64)
    else:
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    return peft.get_peft_model(load_reference(base_dir), config).eval()


def _peft_real_logits(model, ids):
    """peft's logits for the caller's tokens: prompt tuning returns (B, P + T, V), prefix tuning (B, T, V)."""
    logits = hf_logits(model, ids)
    return logits[:, -ids.shape[1]:]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_peft_saved_prompt_loads_with_equal_logits_and_decoding(base_dir, tmp_path, method):
    reference = _peft_model(base_dir, method)
    reference.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_hf(base_dir), tmp_path / "adapter").eval()
    ids = _ids()
    expected = _peft_real_logits(reference, ids)
    assert (expected - hf_logits(load_reference(base_dir), ids)).abs().max() > 1e-2  # the prompt matters
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=0)
    # Greedy decoding through lmstack's cache (virtual slots filled on the first call) = greedy on peft's
    # full forward. (peft's own generate is no reference here: under transformers 5.24 it warns that it
    # ignores the past_key_values it passes, and its tokens differ from its forward's.)
    theirs = ids
    for _ in range(6):
        theirs = torch.cat([theirs, _peft_real_logits(reference, theirs)[:, -1:].argmax(-1)], dim=1)
    mine = generate(ours, ids, GenerationConfig(max_new_tokens=6))
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("method,projection", [("prefix", None), ("prefix", 16), ("prompt", None)])
def test_lmstack_prompt_loads_in_peft_and_gradients_match(base_dir, tmp_path, method, projection):
    reference = _peft_model(base_dir, method, projection).train()
    ours = load_hf(base_dir)
    encoder = reference.prompt_encoder["default"]
    if method == "prefix":
        apply_prefix_tuning(ours, P, projection=projection)
        ours.prefix_encoder.load_state_dict(encoder.state_dict())
        learned = dict(ours.prefix_encoder.named_parameters())
    else:
        from lmstack.peft import apply_prompt_tuning
        apply_prompt_tuning(ours, P)
        with torch.no_grad():
            ours.prompt_embeddings.weight.copy_(encoder.embedding.weight)
        learned = {"embedding.weight": ours.prompt_embeddings.weight}
    ids = _ids()
    # Gradients of the learned tensors, through the caller's tokens' logits.
    _peft_real_logits_grad(reference, ids).square().mean().backward()
    ours.train()(ids).square().mean().backward()
    theirs = dict(encoder.named_parameters())
    assert set(learned) == set(theirs)
    for name, param in learned.items():
        assert param.grad is not None and param.grad.abs().max() > 0, name
        torch.testing.assert_close(param.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    # Our file, loaded by peft onto the same base, gives the same logits.
    save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(load_reference(base_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(_peft_real_logits(loaded, ids), ours.eval()(ids), atol=1e-5, rtol=0)


def _peft_real_logits_grad(model, ids):
    return model(input_ids=ids).logits[:, -ids.shape[1]:]


def test_prompt_tuned_bert_classifier_matches_peft(tmp_path):
    """peft prepends the prompt before [CLS]; its classifier pools the first virtual token, so does ours."""
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3, max_position_embeddings=40)
    torch.manual_seed(0)
    base = randomize_(transformers.BertForSequenceClassification(config).eval())
    base.save_pretrained(tmp_path / "bert")
    reference = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
    reference.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(load_hf(tmp_path / "bert"), tmp_path / "adapter").eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    types = torch.tensor([[0] * 4 + [1] * 3, [0] * 7])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, types)
        plain = base(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
    assert got.hidden_states.shape == (2, 7, 32)  # token-level outputs cover the caller's tokens
