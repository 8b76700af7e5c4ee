"""Alignment speed, lmstack vs trl on the same model, batch and CPU thread count: seconds per SFT and DPO
optimizer step (forward + backward + AdamW on one fixed batch), and rollout throughput (sampled completion
tokens per second) of GRPO (trl 1.16's ``_generate_and_score_completions``) and PPO (the calls trl 1.12's
``PPOTrainer.train`` makes for a rollout: ``batch_generation``, the reference forward, ``get_reward`` for the
value and the reward model; lmstack's ``PPORollouts`` additionally computes GAE and the whitening).

The model is a random-init Llama (4 layers, hidden 256, vocabulary --vocab: 2048, or 49152 for SmolLM2's
tokenizer size, where the LM head outweighs the blocks) built offline with transformers and loaded by both.
Steps are timed after warm-up, configurations interleaved over --rounds, medians kept.
trl 1.12 (PPO) is read from the side folder the Makefile installs (.venv/side/trl-ppo); without it that
column is skipped with a hint.

    python benchmarks/align.py [--rounds 3] [--steps 4] [--threads 1] [--vocab 2048]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/peft.py would shadow the peft package trl imports: this folder leaves the path, the root joins it.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.table import print_table  # noqa: E402

WORDS = ("the a cat dog sat ran on in park mat house tree river blue red green one two three four five what is how "
         "are you hello there good bad answer question tell me about why because when where yes no please thank "
         "small large quick brown fox jumps over lazy model language token learn train").split()
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<bos>assistant: {% generation %}"
            "{{ m['content'] }}<eos>{% endgeneration %}{% else %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<bos>assistant: {% endif %}")
PPO_SCRIPT = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import torch, transformers
torch.set_num_threads(int(sys.argv[4]))
import trl.experimental.ppo.ppo_trainer as ppo
root = sys.argv[2]
load = lambda cls, name: cls.from_pretrained(f"{root}/{name}", dtype=torch.float32).eval()
policy, ref = load(transformers.AutoModelForCausalLM, "policy"), load(transformers.AutoModelForCausalLM, "ref")
value = load(transformers.AutoModelForSequenceClassification, "value")
reward = load(transformers.AutoModelForSequenceClassification, "value")
queries = torch.tensor(json.loads(sys.argv[3]))
config = transformers.GenerationConfig(max_new_tokens=64, min_new_tokens=64, temperature=0.7 + 1e-7, top_k=0,
                                       top_p=1.0, do_sample=True)
def rollout():  # the calls PPOTrainer.train() makes for one rollout, in its order
    context = queries.shape[1]
    with torch.no_grad():
        query_responses, logits = ppo.batch_generation(policy, queries, queries.shape[0], 0, config)
        response = query_responses[:, context:]
        logprob = ppo.selective_log_softmax(logits, response)
        ref_logits = ppo.forward(ref, query_responses, 0).logits[:, context - 1:-1] / (0.7 + 1e-7)
        ref_logprob = ppo.selective_log_softmax(ref_logits, response)
        full_value, _, _ = ppo.get_reward(value, query_responses, 0, context)
        _, score, _ = ppo.get_reward(reward, query_responses, 0, context)
    return response.numel()
rollout()
times = []
for _ in range(3):
    start = time.perf_counter()
    tokens = rollout()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(times)[1], "tokens": tokens}))
"""


def _text(rng, n):
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=rng))


def build(root: Path, vocab: int):
    import transformers

    from lmstack.tokenizers import train_bpe
    rng = torch.Generator().manual_seed(0)
    train_bpe([_text(rng, 60) for _ in range(400)], 600, special_tokens=["<pad>", "<eos>", "<bos>"]).save(root)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "policy")
    transformers.LlamaForCausalLM(config).save_pretrained(root / "ref")
    config.num_labels = 1
    transformers.LlamaForSequenceClassification(config).save_pretrained(root / "value")  # value and reward
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="<pad>",
                                               eos_token="<eos>", bos_token="<bos>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "policy")
    rng = torch.Generator().manual_seed(1)
    chats = [[{"role": "user", "content": _text(rng, 20)}, {"role": "assistant", "content": _text(rng, 60)}]
             for _ in range(8)]
    pairs = {"prompt": [_text(rng, 20) for _ in range(8)], "chosen": [" " + _text(rng, 40) for _ in range(8)],
             "rejected": [" " + _text(rng, 40) for _ in range(8)]}
    return tok, chats, pairs


def _median_step(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lmstack_steps(root, tok, chats, pairs, steps):
    from lmstack.align import PreferenceObjective, Reference
    from lmstack.checkpoints import load_hf
    from lmstack.data.preference import collate_pairs, encode_pairs
    from lmstack.data.sft import collate_sft, encode_sft
    from lmstack.tokenizers import load_tokenizer
    from lmstack.train import CausalLMObjective
    from lmstack.train.optim import build_optimizer

    ours_tok = load_tokenizer(root)
    out = {}
    for name in ("sft", "dpo"):
        model = load_hf(root / "policy").train()
        optimizer = build_optimizer(model, 1e-5, 0.0, (0.9, 0.999))
        if name == "sft":
            encoded = encode_sft([{"messages": m} for m in chats], ours_tok, TEMPLATE, eos_id=1, max_length=512)
            batch = collate_sft(encoded.examples, [[i] for i in range(len(chats))], pad_id=0)
            objective = CausalLMObjective()
        else:
            rows = [dict(zip(pairs, values)) for values in zip(*pairs.values())]
            encoded = encode_pairs(rows, ours_tok, None, eos_id=1, max_length=512)
            batch = collate_pairs(encoded.examples, list(range(len(encoded.examples))), pad_id=0)
            objective = PreferenceObjective("sigmoid", beta=0.1, reference=Reference(load_hf(root / "ref")))

        def step():
            loss, _ = objective(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        out[name] = _median_step(step, steps)
    return out


def trl_steps(root, tok, chats, pairs, steps):
    import datasets
    import transformers
    import trl

    common = dict(use_cpu=True, report_to=[], save_strategy="no", bf16=False, per_device_train_batch_size=8,
                  max_length=512, learning_rate=1e-5, weight_decay=0.0)
    load = lambda name: transformers.AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32)  # noqa
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("sft", "dpo"):
            if name == "sft":
                trainer = trl.SFTTrainer(model=load("policy"), processing_class=tok,
                                         args=trl.SFTConfig(output_dir=tmp, assistant_only_loss=True, **common),
                                         train_dataset=datasets.Dataset.from_dict({"messages": chats}))
            else:
                trainer = trl.DPOTrainer(model=load("policy"), ref_model=load("ref"), processing_class=tok,
                                         args=trl.DPOConfig(output_dir=tmp, beta=0.1, **common),
                                         train_dataset=datasets.Dataset.from_dict(pairs))
            trainer.create_optimizer()
            trainer.current_gradient_accumulation_steps = 1  # set by train() itself; training_step reads it
            batch = next(iter(trainer.get_train_dataloader()))
            trainer.model.train()

            def step():
                trainer.training_step(trainer.model, batch)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
            out[name] = _median_step(step, steps)
    return out


def lmstack_rollouts(root, prompts):
    from lmstack.align import (GRPORollouts, PolicyAndValue, PPORollouts, Reference, RewardSource)
    from lmstack.checkpoints import load_hf
    from lmstack.data.prompts import PromptExample
    from lmstack.generate import GenerationConfig
    from lmstack.tokenizers import load_tokenizer

    tok = load_tokenizer(root)
    examples = [PromptExample(p, "", {}) for p in prompts]
    length = lambda completions, **_: [float(len(c)) for c in completions]  # noqa: E731
    generation = GenerationConfig(max_new_tokens=64, do_sample=True, temperature=0.7, top_k=0, eos_token_id=[],
                                  pad_token_id=0)
    policy = load_hf(root / "policy").eval()
    grpo = GRPORollouts(policy, examples[:4], RewardSource(reward_fns=[length], tokenizer=tok), group_size=4,
                        prompts_per_step=4, generation=generation, seed=0, pad_id=0)
    model = PolicyAndValue(policy, load_hf(root / "value"))
    ppo = PPORollouts(model, examples, RewardSource(load_hf(root / "value")),
                      reference=Reference(load_hf(root / "ref")), generation=generation, pad_id=0, seed=0,
                      rollout_size=len(examples), minibatch_size=len(examples), ppo_epochs=1)
    out = {}
    for name, run in (("grpo", grpo.next_batch), ("ppo", ppo._rollout)):
        run()
        times, tokens = [], 0
        for _ in range(3):
            start = time.perf_counter()
            batch = run()
            times.append(time.perf_counter() - start)
            tokens = int(batch["completion_mask"].sum())
        out[name] = tokens / statistics.median(times)
    return out


def trl_grpo_rollout(root, tok, prompts):
    import datasets
    import trl

    length = lambda completions, **_: [float(len(c)) for c in completions]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        args = trl.GRPOConfig(output_dir=tmp, per_device_train_batch_size=16, num_generations=4,
                              max_completion_length=64, temperature=0.7, top_k=0, use_cpu=True, report_to=[],
                              save_strategy="no", bf16=False)
        trainer = trl.GRPOTrainer(model=str(root / "policy"), reward_funcs=length, args=args, processing_class=tok,
                                  train_dataset=datasets.Dataset.from_dict({"prompt": [tok.decode(p) for p in
                                                                                       prompts[:4]] * 4}))
        trainer.current_gradient_accumulation_steps = 1
        inputs = next(iter(trainer.get_train_dataloader()))
        trainer.model.generation_config.eos_token_id = None  # every completion runs to 64 tokens, as lmstack's
        trainer._generate_and_score_completions(inputs)
        times, tokens = [], 0
        for _ in range(3):
            start = time.perf_counter()
            out = trainer._generate_and_score_completions(inputs)
            times.append(time.perf_counter() - start)
            tokens = int(out["completion_mask"].sum())
    return tokens / statistics.median(times)


def trl_ppo_rollout(root, prompts, threads):
    side = ROOT / ".venv" / "side" / "trl-ppo"
    if not (side / "trl" / "experimental" / "ppo").is_dir():
        print(f"(trl 1.12 PPO column skipped: pip install --no-deps --target {side} trl==1.12.0)")
        return None
    width = max(len(p) for p in prompts)
    queries = [[0] * (width - len(p)) + p for p in prompts]
    done = subprocess.run([sys.executable, "-c", PPO_SCRIPT, str(side), str(root), json.dumps(queries),
                           str(threads)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        print(f"(trl 1.12 PPO column failed: {done.stderr[-500:]})")
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["tokens"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians kept)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per configuration and round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size, >= 600 (49152: SmolLM2's)")
    args = parser.parse_args()
    if args.vocab < 600:
        parser.error("--vocab must be at least 600 (the benchmark's tokenizer has 600 tokens)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok, chats, pairs = build(root, args.vocab)
        rng = torch.Generator().manual_seed(2)
        prompts = [tok.encode(_text(rng, 12)) for _ in range(16)]
        ours, theirs = {"sft": [], "dpo": []}, {"sft": [], "dpo": []}
        for _ in range(args.rounds):
            for key, value in lmstack_steps(root, tok, chats, pairs, args.steps).items():
                ours[key].append(value)
            for key, value in trl_steps(root, tok, chats, pairs, args.steps).items():
                theirs[key].append(value)
        rollouts = lmstack_rollouts(root, prompts)
        trl_grpo = trl_grpo_rollout(root, tok, prompts)
        trl_ppo = trl_ppo_rollout(root, prompts, args.threads)
    rows = []
    for key in ("sft", "dpo"):
        a, b = statistics.median(ours[key]), statistics.median(theirs[key])
        rows.append((f"{key.upper()} s/step (batch 8)", f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}x", ">= 1.5x"))
    rows.append(("GRPO rollout tokens/s (16 x 64)", f"{rollouts['grpo']:.0f}", f"{trl_grpo:.0f}",
                 f"{rollouts['grpo'] / trl_grpo:.2f}x", ">= 2x"))
    if trl_ppo:
        rows.append(("PPO rollout tokens/s (16 x 64)", f"{rollouts['ppo']:.0f}", f"{trl_ppo:.0f}",
                     f"{rollouts['ppo'] / trl_ppo:.2f}x", ">= 2x"))
    print(f"\nthreads {args.threads}; model: Llama 4 layers, hidden 256, vocab {args.vocab} (random init, fp32)")
    print_table(("", "lmstack", "trl", "lmstack speed", "target"), rows)


if __name__ == "__main__":
    main()
