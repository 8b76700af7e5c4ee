"""`lmstack grpo` and `lmstack ppo` end to end on the tiny decoder: they sample, score, train, log the RL
numbers and their curves, resume, export, and name bad reward functions and prompts clearly."""

import json
import math

import pytest

from lmstack.checkpoints import load_hf
from lmstack.cli import main
from lmstack.train.trainer import read_metrics
from tests.recipes.tiny import tiny_llama_dir

COMMON = ["--train.max_steps", "2", "--train.batch_size", "2", "--train.warmup_steps", "0", "--train.eval_every",
          "0", "--train.progress", "false", "--sampling.max_new_tokens", "6"]
REWARDS = '''
import math
calls = []

def length(completions, **_):
    return [float(len(c)) for c in completions]

def some_nan(completions, answer, **_):
    return [math.nan if a == 3 else 1.0 for a in answer]

def broken(completions, **_):
    raise KeyError("no such field")
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"prompt": f"{a} plus {b} is", "answer": a + b}) + "\n"
                                for a in range(1, 4) for b in range(1, 3)))
    chats = root / "chat_prompts.jsonl"
    chats.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} plus 1?"}],
                                         "answer": a + 1}) + "\n" for a in range(4)))
    (root / "rewards.py").write_text(REWARDS)
    return {"model": tiny_llama_dir(root / "model"), "problems": problems, "chats": chats,
            "rewards": root / "rewards.py"}


def test_grpo_run_logs_rewards_resumes_and_exports(files, tmp_path):
    out = tmp_path / "grpo"
    args = ["grpo", "--model.path", str(files["model"]), "--data.train", str(files["problems"]), "--data.eval",
            str(files["problems"]), "--reward.functions", f"[exact_answer, {files['rewards']}:length]",
            "--reward.weights", "[1.0, 0.1]", "--group-size", "3", "--beta", "0.05", "--peft.method", "lora",
            "--out", str(out), *COMMON]
    main(args)
    first = read_metrics(out / "metrics.jsonl")
    assert {"reward", "reward_std", "kl", "clip_fraction", "completion_length"} <= set(first[-1])
    assert "eval_reward" in first[-1] and first[-1]["reward"] > 0  # the length reward is never zero
    assert (out / "rl.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert load_hf(out / "model").config.vocab_size > 0
    main([*args[:-len(COMMON)], *COMMON[:1], "3", *COMMON[2:], "--resume"])
    again = read_metrics(out / "metrics.jsonl")
    assert [r["loss"] for r in again[:2]] == [r["loss"] for r in first] and len(again) == 3


def test_ppo_run_with_chat_prompts_logs_kl_and_writes_the_value_model(files, tmp_path):
    out = tmp_path / "ppo"
    main(["ppo", "--model.path", str(files["model"]), "--data.train", str(files["chats"]), "--data.eval",
          str(files["chats"]), "--reward.functions", f"[{files['rewards']}:length]", "--rollout-prompts", "4",
          "--ppo-epochs", "2", "--missing-eos-penalty", "1.0", "--out", str(out), *COMMON])
    records = read_metrics(out / "metrics.jsonl")
    assert {"kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "score", "eos_fraction"} <= set(records[-1])
    assert math.isfinite(records[-1]["eval_reward"])
    assert load_hf(out / "value").config.num_scores == 1 and (out / "rl.png").is_file()
    # The resolved recipe the run saved reruns it: same rollouts, same losses.
    main(["ppo", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again")])
    assert [r["loss"] for r in read_metrics(tmp_path / "again" / "metrics.jsonl")] == [r["loss"] for r in records]


def test_nan_rewards_are_counted_and_bad_rewards_named(files, tmp_path, capsys):
    out = tmp_path / "nan"
    main(["grpo", "--model.path", str(files["model"]), "--data.train", str(files["problems"]), "--reward.functions",
          f"[{files['rewards']}:some_nan]", "--group-size", "2", "--out", str(out), *COMMON[:2], "--train.batch_size",
          "6", *COMMON[4:]])
    assert read_metrics(out / "metrics.jsonl")[0]["reward_nan"] == 2 * 2  # two prompts have answer 3, x2 samples
    base = ["--model.path", str(files["model"]), "--data.train", str(files["problems"]), *COMMON]
    for job, extra, message in [
            ("grpo", ["--reward.functions", f"[{files['rewards']}:broken]"],
             "'broken' raised KeyError: 'no such field'"),
            ("grpo", ["--reward.functions", "[exactly]"], "unknown reward function 'exactly'"),
            ("grpo", ["--reward.functions", f"[{files['rewards']}:nope]"], "has no function 'nope'"),
            ("ppo", [], "give exactly one of reward.functions and reward.model"),
            ("grpo", ["--reward.functions", "[short]", "--group-size", "1"], "group_size must be >= 2")]:
        assert main([job, *base, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_prompts_longer_than_the_limit_are_skipped_and_counted(files, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(files["problems"].read_text() + json.dumps({"prompt": "one two three four " * 20}) + "\n")
    assert main(["grpo", "--model.path", str(files["model"]), "--data.train", str(mixed), "--reward.functions",
                 "[short]", "--data.max_prompt_length", "24", "--out", str(tmp_path / "long"), *COMMON]) in (0, None)
    assert "6 examples (skipped: 1 longer than max_prompt_length)" in capsys.readouterr().out
    assert main(["grpo", "--model.path", str(files["model"]), "--data.train", str(mixed), "--reward.functions",
                 "[short]", "--data.max_prompt_length", "2", "--out", str(tmp_path / "none"), *COMMON]) == 2
    assert "no prompt fits in max_prompt_length=2" in capsys.readouterr().err
