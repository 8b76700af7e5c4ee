"""The continuous-batching engine: greedy tokens equal lmstack.generate's whatever the interleaving, the
token budget, chunked prefill or preemption; prefix blocks are reused; cancelling frees blocks at once."""

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.generate import GenerationConfig, generate
from lmstack.models import DecoderConfig, build_model
from lmstack.serve import Engine, SamplingParams

NEW = 10


@pytest.fixture(scope="module")
def model():
    config = DecoderConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128,
                           sliding_window=7)
    return build_model(config, seed=0).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    out = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 12)]
    return out + [out[3][:20] + [5, 6]]  # shares 20 tokens (5 blocks of 4) with the fourth


@pytest.fixture(scope="module")
def reference(model, prompts):
    config = GenerationConfig(max_new_tokens=NEW, eos_token_id=[])
    return [generate(model, torch.tensor([p]), config)[0, len(p):].tolist() for p in prompts]


def _serve(engine, prompts, every: int):
    """Add one request every ``every`` steps; return each prompt's tokens."""
    ids, results, pending, step = {}, {}, list(enumerate(prompts)), 0
    while pending or engine.has_work:
        if pending and step % every == 0:
            i, p = pending.pop(0)
            ids[engine.add(p, SamplingParams(max_tokens=NEW, temperature=0))] = i
        for out in engine.step():
            results.setdefault(ids[out.seq_id], []).append(out.sample.token)
        step += 1
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("num_blocks,budget,every", [(64, 256, 1), (64, 8, 2), (12, 16, 2), (10, 5, 3)])
def test_greedy_tokens_equal_generate_whatever_the_schedule(model, prompts, reference, num_blocks, budget, every):
    engine = Engine(model, num_blocks=num_blocks, block_size=4, max_batch=4, max_batch_tokens=budget,
                    eos_token_ids=[])
    assert _serve(engine, prompts, every) == reference
    assert engine.allocator.num_free == num_blocks  # every block came back
    if num_blocks <= 12:
        assert engine.preemptions > 0  # the small pools did preempt and recompute


def test_shared_prompt_prefixes_reuse_cached_blocks(model, prompts, reference):
    engine = Engine(model, num_blocks=64, block_size=4, eos_token_ids=[])
    first = engine.add(prompts[3], SamplingParams(max_tokens=NEW, temperature=0))
    engine.run_to_completion()
    second = engine.add(prompts[-1], SamplingParams(max_tokens=NEW, temperature=0))
    seq = engine.sequences[second]
    out = engine.run_to_completion()
    assert seq.cached_tokens == 20 and out[second] == reference[-1] and first != second
    assert engine.allocator.hits == 5


def test_cancel_frees_blocks_at_once(model, prompts):
    engine = Engine(model, num_blocks=32, block_size=4, eos_token_ids=[])
    a = engine.add(prompts[3], SamplingParams(max_tokens=50, temperature=0))
    engine.add(prompts[1], SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    used = engine.allocator.num_used
    engine.cancel(a)
    assert engine.allocator.num_used < used
    assert engine.step()[0].finish_reason == "cancelled"
    engine.cancel(a)  # twice, or an unknown id: nothing happens
    engine.cancel(12345)


def test_finish_reasons(model, prompts, reference):
    tokens = reference[0]
    stop_at = next(t for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])  # first seen after 2 tokens
    engine = Engine(model, num_blocks=32, block_size=4, eos_token_ids=[stop_at])
    a = engine.add(prompts[0], SamplingParams(max_tokens=NEW, temperature=0))
    b = engine.add(prompts[0], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    c = engine.add(prompts[0], SamplingParams(max_tokens=2, temperature=0))
    reasons = {}
    while engine.has_work:
        for out in engine.step():
            if out.finish_reason:
                reasons[out.seq_id] = out.finish_reason
    assert reasons == {a: "stop", b: "length", c: "length"}


def test_seeded_sampling_is_reproducible(model, prompts):
    def run(seed):
        engine = Engine(model, num_blocks=32, block_size=4, eos_token_ids=[])
        sid = engine.add(prompts[1], SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=seed))
        return engine.run_to_completion()[sid]

    assert run(3) == run(3) and run(3) != run(4)


def test_penalties_and_logit_bias_steer_sampling(model, prompts):
    engine = Engine(model, num_blocks=32, block_size=4, eos_token_ids=[])
    forced = engine.add(prompts[1], SamplingParams(max_tokens=4, temperature=0, logit_bias={42: 100.0}))
    varied = engine.add(prompts[1], SamplingParams(max_tokens=6, temperature=0, logit_bias={42: 100.0},
                                                   presence_penalty=2.0, frequency_penalty=200.0))
    out = engine.run_to_completion()
    assert out[forced] == [42] * 4
    assert out[varied][0] == 42 and 42 not in out[varied][1:]


def test_logprobs_are_the_models_own(model, prompts):
    engine = Engine(model, num_blocks=32, block_size=4, eos_token_ids=[])
    engine.add(prompts[2], SamplingParams(max_tokens=1, temperature=0, logprobs=True, top_logprobs=3))
    sample = engine.step()[0].sample
    with torch.no_grad():
        expected = model(torch.tensor([prompts[2]]))[0, -1].log_softmax(-1)
    assert sample.top[0][0] == sample.token == int(expected.argmax())
    assert sample.logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert [t for t, _ in sample.top] == expected.topk(3).indices.tolist()


@pytest.mark.parametrize("prompt,params,message", [
    ([], SamplingParams(), "empty prompt"),
    ([1] * 128, SamplingParams(), "context"),
    ([1, 300], SamplingParams(), r"token ids must be in \[0, 300\)"),
    ([1] * 60, SamplingParams(max_tokens=60), "more KV blocks"),
    ([1], SamplingParams(max_tokens=0), "max_tokens"),
])
def test_bad_requests_are_refused(model, prompt, params, message):
    engine = Engine(model, num_blocks=16, block_size=4)
    with pytest.raises(ConfigError, match=message):
        engine.add(prompt, params)


def test_bad_engine_settings(model):
    with pytest.raises(ConfigError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(ValueError, match="num_blocks"):
        Engine(model, num_blocks=0)
