"""generate / stream: cache-consistent decoding, reproducible sampling, streaming, stop strings, bad input."""

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.generate import GenerationConfig, generate, stream, text_deltas
from lmstack.models import DecoderConfig, build_model


class ByteTokenizer:
    """ids 0..255 are bytes; enough to test text streaming and stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model():
    config = DecoderConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                           sliding_window=5)
    return build_model(config, seed=0).eval()


def _naive_greedy(model, ids, steps):
    """Recompute the whole prefix every step: no cache, the obvious reference."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_greedy_equals_recomputing_the_prefix(model):
    ids = torch.randint(0, 300, (2, 5))
    out = generate(model, ids, GenerationConfig(max_new_tokens=12, eos_token_id=[]))
    assert torch.equal(out, _naive_greedy(model, ids, 12))  # 17 tokens: past the sliding window of 5


def test_left_padded_row_generates_as_if_alone(model):
    short, long = torch.randint(0, 300, (1, 3)), torch.randint(0, 300, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    config = GenerationConfig(max_new_tokens=8, eos_token_id=[])
    together = generate(model, batch, config, attention_mask=mask)
    assert torch.equal(together[0, 3:], generate(model, short, config)[0])
    assert torch.equal(together[1], generate(model, long, config)[0])


def test_seeded_sampling_is_reproducible(model):
    ids = torch.randint(0, 300, (2, 4))
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0, seed=7, eos_token_id=[])
    first, again = generate(model, ids, config), generate(model, ids, config)
    other = generate(model, ids, GenerationConfig(**{**config.__dict__, "seed": 8}))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_top_k_one_sampling_is_greedy(model):
    ids = torch.randint(0, 300, (2, 4))
    sampled = generate(model, ids, GenerationConfig(max_new_tokens=8, do_sample=True, top_k=1, seed=0, eos_token_id=[]))
    assert torch.equal(sampled, generate(model, ids, GenerationConfig(max_new_tokens=8, eos_token_id=[])))


def test_num_return_sequences_with_sampling(model):
    ids = torch.randint(0, 300, (2, 4))
    out = generate(model, ids, GenerationConfig(max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=1))
    assert out.shape == (6, 9)
    assert torch.equal(out[:3, :4], ids[:1].expand(3, 4))


def test_eos_ends_rows_and_pads_them(model):
    ids = torch.randint(0, 300, (1, 4))
    free = generate(model, ids, GenerationConfig(max_new_tokens=10, eos_token_id=[]))
    eos = int(free[0, 6])  # the third new token (it may also occur earlier)
    first = free[0, 4:].tolist().index(eos)
    out = generate(model, ids, GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=299))
    assert out.shape[1] == 4 + first + 1 and int(out[0, -1]) == eos  # stops right after emitting EOS
    assert torch.equal(out[0], free[0, :4 + first + 1])


def test_stream_yields_the_same_tokens_as_generate(model):
    ids = torch.randint(0, 300, (2, 4))
    config = GenerationConfig(max_new_tokens=9, eos_token_id=[])
    streamed = torch.stack(list(stream(model, ids, config)), dim=1)
    assert torch.equal(streamed, generate(model, ids, config)[:, 4:])


def test_text_deltas_hold_back_partial_characters():
    tokens = list("héllo ".encode()) + list("🙂".encode()) + [300, 104]  # 300: end of sequence
    deltas = list(text_deltas(iter(tokens), ByteTokenizer(), stop_ids={300}))
    assert "".join(deltas) == "héllo 🙂"
    assert all("\ufffd" not in d for d in deltas)
    assert "🙂" in deltas  # the four-byte emoji arrives whole, once


def test_stream_text_with_a_tokenizer(model):
    ids = torch.tensor([[104, 105]])
    config = GenerationConfig(max_new_tokens=6, eos_token_id=[])
    tokens = generate(model, ids, config)[0, 2:].tolist()
    text = "".join(stream(model, ids, config, tokenizer=ByteTokenizer()))
    assert text == ByteTokenizer().decode(tokens).rstrip("\ufffd")


def test_stop_strings_end_a_row(model):
    ids = torch.randint(0, 256, (1, 4))
    config = GenerationConfig(max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    free = generate(model, ids, config)[0, 4:].tolist()
    stop = ByteTokenizer().decode(free[2:4])  # text that appears after the 4th new token
    out = generate(model, ids, GenerationConfig(max_new_tokens=12, eos_token_id=[], pad_token_id=0,
                                                stop_strings=[stop]), tokenizer=ByteTokenizer())
    text = ByteTokenizer().decode(out[0, 4:].tolist())
    assert stop in text and out.shape[1] < 16


@pytest.mark.parametrize("options, message", [
    (dict(top_p=0.0), "top_p=0.0 must be in"),
    (dict(top_p=1.5), "top_p=1.5 must be in"),
    (dict(do_sample=True, temperature=0.0), "temperature=0.0 must be > 0 when sampling"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 cannot exceed num_beams=2"),
    (dict(num_return_sequences=2), "greedy decoding returns one sequence"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop_strings="x"), "stop_strings needs a tokenizer"),
])
def test_bad_options_are_named(model, options, message):
    with pytest.raises(ConfigError, match=message):
        generate(model, torch.zeros(1, 3, dtype=torch.long), GenerationConfig(**options))


def test_bad_prompts_are_named(model):
    with pytest.raises(ConfigError, match="empty prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"empty prompt: rows \[1\]"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ConfigError, match="prompt of 60 tokens \\+ max_new_tokens=10 exceeds the model's context "
                                          "window of 64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), GenerationConfig(max_new_tokens=10))
    with pytest.raises(ConfigError, match="not beam search"):
        stream(model, torch.zeros(1, 3, dtype=torch.long), GenerationConfig(num_beams=2))


def test_special_tokens_are_hidden_from_streamed_text_unless_asked():
    from lmstack.tokenizers import train_bpe
    from tests.tokenizers.corpus import TRAIN

    tok = train_bpe(TRAIN, 300, special_tokens=["<|im_start|>", "<|im_end|>"])
    ids = tok.encode("hi <|im_start|>there", add_special_tokens=False)
    assert "".join(text_deltas(iter(ids), tok, stop_ids=set(), skip_special_tokens=True)) == "hi there"
    assert "<|im_start|>" in "".join(text_deltas(iter(ids), tok, stop_ids=set()))
