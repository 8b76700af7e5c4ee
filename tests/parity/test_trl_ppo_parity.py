"""PPO's pieces equal to trl 1.12's PPOTrainer on the same weights and samples (REFERENCES.md, section 2).

trl removed PPO after 1.12, so 1.12 lives in a side folder (the Makefile installs it with
``--no-deps --target .venv/side/trl-ppo``) and runs in a subprocess: one PPO update (4 prompts, 8 response
tokens, two PPO epochs, a learning rate high enough that the second epoch's ratios clip). The subprocess
records what trl computed inside ``train()`` — the sampled query+responses, the advantages before and after
whitening, each epoch's policy logits and value predictions — and the metrics it logged. lmstack then
recomputes, from the same starting weights and the same samples: the completion mask, tempered old and
reference log-probs, values, reward-model scores, per-token KL rewards, GAE advantages and returns, the
whitening, and both epochs' clipped policy / value losses and clip fractions.

trl puts the score one slot after the last kept token (huggingface/trl#3750); lmstack's trainer puts it on
the last token. The pieces take the position as an argument, so here they get trl's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.align import gae, masked_whiten, ppo_losses, ppo_rewards, token_logps
from lmstack.align.ppo import PolicyAndValue
from lmstack.align.reward import sequence_rewards
from lmstack.align.rollouts import completion_mask_until_eos, mask_positions
from lmstack.checkpoints import load_hf
from lmstack.tokenizers import train_bpe
from tests.parity.hf_reference import make_hf_model, randomize_

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SIDE = ROOT / ".venv" / "side" / "trl-ppo"
PROMPTS = ["what is two plus two?", "say hello", "name a colour", "count to three"]
TEMPERATURE, KL_COEF, EOS_PUSH = 0.7, 0.05, 8.0

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
root, out = sys.argv[2], sys.argv[3]
import torch, transformers, datasets
from safetensors.torch import save_file
import trl.experimental.ppo.ppo_trainer as ppo

seen = {"forward": []}
generation, whiten, forward = ppo.batch_generation, ppo.masked_whiten, ppo.forward
def batch_generation(*args, **kwargs):
    query_responses, logits = generation(*args, **kwargs)
    seen["query_responses"] = query_responses.clone()
    return query_responses, logits
def masked_whiten(values, mask, shift_mean=True):
    result = whiten(values, mask, shift_mean)
    seen.setdefault("whiten", (values.clone(), mask.clone(), result.clone()))
    return result
def forward_(model, query_responses, pad_token_id):
    result = forward(model, query_responses, pad_token_id)
    if isinstance(result, tuple):  # the policy-and-value wrapper: a training forward
        seen["forward"].append((query_responses.clone(), result[0].logits.detach().clone(), result[1].detach().clone()))
    return result
ppo.batch_generation, ppo.masked_whiten, ppo.forward = batch_generation, masked_whiten, forward_

tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{root}/tokenizer.json", pad_token="<pad>",
                                           eos_token="<eos>", bos_token="<bos>", padding_side="left")
load = lambda cls, name: cls.from_pretrained(f"{root}/{name}", dtype=torch.float32)
prompts = json.loads(sys.argv[4])
args = ppo.PPOConfig(output_dir=f"{out}/run", per_device_train_batch_size=4, total_episodes=4, num_ppo_epochs=2,
                     num_mini_batches=1, response_length=8, stop_token="eos", num_sample_generations=0,
                     temperature=0.7, kl_coef=0.05, learning_rate=0.02, seed=0, bf16=False, use_cpu=True,
                     report_to=[], save_strategy="no")
trainer = ppo.PPOTrainer(args=args, processing_class=tok, model=load(transformers.AutoModelForCausalLM, "policy"),
                         ref_model=load(transformers.AutoModelForCausalLM, "ref"),
                         reward_model=load(transformers.AutoModelForSequenceClassification, "reward"),
                         value_model=load(transformers.AutoModelForSequenceClassification, "value"),
                         train_dataset=datasets.Dataset.from_dict({"input_ids": [tok.encode(p) for p in prompts]}))
logged = []
log = trainer.log
trainer.log = lambda metrics, *a, **k: (logged.append(dict(metrics)), log(metrics, *a, **k))
trainer.train()
tensors = {"query_responses": seen["query_responses"], "advantages_raw": seen["whiten"][0],
           "advantage_mask": seen["whiten"][1].long(), "advantages_whitened": seen["whiten"][2]}
for epoch, (inputs, logits, values) in enumerate(seen["forward"]):
    tensors.update({f"inputs_{epoch}": inputs, f"logits_{epoch}": logits, f"values_{epoch}": values})
save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/seen.safetensors")
print(json.dumps(logged[0]))
"""


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    if not (SIDE / "trl" / "experimental" / "ppo").is_dir():
        pytest.skip(f"trl 1.12 side folder missing: pip install --no-deps --target {SIDE} trl==1.12.0 "
                    "(make setup does)")
    root = tmp_path_factory.mktemp("ppo")
    train_bpe(PROMPTS * 10 + ["four hello blue one two three the cat sat"] * 10, 300,
              special_tokens=["<pad>", "<eos>", "<bos>"]).save(root)
    sizes = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config = transformers.LlamaConfig(**sizes)
    make_hf_model(config, seed=0).save_pretrained(root / "ref")
    policy = make_hf_model(config, seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # policy != reference: the KL term is not zero
        # EOS likelier (its head row along the mean final hidden state), so some 8-token responses stop early.
        ids = torch.tensor([[5, 9, 14, 30, 41, 77, 100, 150]])
        hidden = policy(ids, output_hidden_states=True).hidden_states[-1].mean((0, 1))
        policy.lm_head.weight[1] = EOS_PUSH * hidden / hidden.norm()
    policy.save_pretrained(root / "policy")
    for name, seed in (("reward", 1), ("value", 2)):
        torch.manual_seed(seed)
        head = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**sizes, num_labels=1))
        randomize_(head).save_pretrained(root / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(SIDE), str(root), str(root), json.dumps(PROMPTS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = json.loads(done.stdout.strip().splitlines()[-1])
    seen = load_file(root / "seen.safetensors")
    return root, seen, logged


def test_ppo_experience_and_losses_equal_trl(trl_run):
    root, seen, logged = trl_run
    queries = seen["query_responses"]
    n, width = queries.shape
    R = seen["advantage_mask"].shape[1]  # the longest response (generation stops once every row has)
    context = width - R
    policy, ref = load_hf(root / "policy").eval(), load_hf(root / "ref").eval()
    model = PolicyAndValue(policy, load_hf(root / "value").eval())
    reward_model = load_hf(root / "reward").eval()

    # The completion mask: trl's ~padding_mask (up to and including the first EOS).
    completion = completion_mask_until_eos(queries[:, context:], [1])
    assert torch.equal(completion, seen["advantage_mask"])
    assert 0 < int(completion.sum()) < completion.numel()  # some responses stopped early: masks matter
    prompt_attention = (queries[:, :context] != 0).long()
    attention = torch.cat([prompt_attention, completion], 1)
    scored = torch.cat([torch.zeros_like(prompt_attention), completion], 1)
    positions = mask_positions(attention)
    with torch.no_grad():
        old = token_logps(policy, queries, attention, scored, positions, temperature=TEMPERATURE)[:, context - 1:]
        ref_logps = token_logps(ref, queries, attention, scored, positions, temperature=TEMPERATURE)[:, context - 1:]
        values = model.values(queries, attention, positions)[:, context - 1:]
        scores = sequence_rewards(reward_model, queries, attention, positions)

    # trl's placement: values kept one slot past the last token, the score on that slot (inside the row).
    last = completion.sum(-1) - 1
    slot = torch.where(last + 1 < R, last + 1, last)
    value_mask = (torch.arange(R) <= (last + 1)[:, None]).long()
    values = values * value_mask
    rewards, kl = ppo_rewards(old * completion, ref_logps * completion, scores, slot, KL_COEF)
    advantages, returns = gae(rewards, values, value_mask, gamma=1.0, lam=0.95)
    assert torch.allclose(advantages * completion, seen["advantages_raw"] * completion, atol=1e-5)
    whitened = masked_whiten(advantages, completion) * completion
    assert torch.allclose(whitened, seen["advantages_whitened"] * completion, atol=1e-5)
    kl_sum = (kl * completion).sum(-1)
    assert float(kl_sum.mean()) == pytest.approx(logged["objective/kl"], abs=1e-5)
    assert float(scores.mean()) == pytest.approx(logged["objective/scores"], abs=1e-5)
    assert float((-KL_COEF * kl_sum).mean()) == pytest.approx(logged["objective/non_score_reward"], abs=1e-5)

    # Both PPO epochs: trl's own policy logits / value predictions (the weights move between epochs) into
    # lmstack's losses, rows in trl's shuffled order.
    totals = {"pg": 0.0, "vf": 0.0, "clip": 0.0, "vclip": 0.0}
    for epoch in range(2):
        rows = [next(i for i in range(n) if torch.equal(queries[i], row)) for row in seen[f"inputs_{epoch}"]]
        logits = seen[f"logits_{epoch}"][:, context - 1:-1] / (TEMPERATURE + 1e-7)
        responses = queries[rows, context:]
        new = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
        vpred = seen[f"values_{epoch}"][:, context - 1:-1, 0] * value_mask[rows]
        pg, vf, stats = ppo_losses(new, old[rows], whitened[rows], vpred, values[rows], returns[rows], completion[rows],
                                   clip_range=0.2, clip_range_value=0.2, value_mask=value_mask[rows])
        totals["pg"] += float(pg) / 2
        totals["vf"] += float(vf) / 2
        totals["clip"] += float(stats["clip_fraction"]) / 2
        totals["vclip"] += float(stats["value_clip_fraction"]) / 2
    assert totals["clip"] > 0  # the second epoch's ratios left the clip range: clipping is exercised
    assert totals["pg"] == pytest.approx(logged["loss/policy_avg"], abs=1e-5)
    assert totals["vf"] == pytest.approx(logged["loss/value_avg"], abs=1e-5)
    assert totals["clip"] == pytest.approx(logged["policy/clipfrac_avg"], abs=1e-5)
    assert totals["vclip"] == pytest.approx(logged["val/clipfrac_avg"], abs=1e-5)
