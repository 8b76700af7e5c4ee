"""`lmstack convert SRC DST`: write a model as a Hugging Face-format directory: from another HF directory
(recast, re-sharded) or from a GGUF file (dequantised, with its tokenizer, chat template and generation
config). The source's tokenizer files come along; nothing else in DST is touched except the weight files
of an earlier save there.

`lmstack convert SRC FILE.gguf --type q8_0` writes a GGUF file for llama.cpp instead (F32, F16, Q8_0, Q4_0,
Q4_1; llama-layout families), with the tokenizer and chat template as GGUF metadata.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmstack.checkpoints import is_gguf, load_hf, save_hf
from lmstack.errors import ConfigError
from lmstack.fileio import output_directory, write_json
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.tokenizers import tokenizer_from_json
from lmstack.recipes.configs.convert import ConvertConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "chat_template.jinja", "generation_config.json", "tokenizer.model")


@contextmanager
def staged_output(source: Path, output: Path) -> Iterator[Path]:
    """A private folder beside ``output`` to build a derived checkpoint in (``lmstack quantize``, ``prune``): when
    the block succeeds its files move into ``output`` (config.json last); the folder is removed either way, so a
    failed run (short calibration text, a bad setting) leaves ``output`` as it was.

    Raises:
        ConfigError: ``output`` is the source itself, or a place no directory can be written.
    """
    output_directory(output, "output")
    if source.resolve() == output.resolve():
        raise ConfigError(f"output {output} is the source itself; choose another directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        yield work
        output.mkdir(exist_ok=True)
        for file in sorted(work.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(file, output / file.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(cfg: ConvertConfig) -> Path:
    source = resolve_model_dir(cfg.source)
    if source.resolve() == cfg.output.resolve():
        raise ConfigError(f"output {cfg.output} is the source itself; choose another directory")
    if cfg.output.suffix == ".gguf":
        return _export_gguf(source, cfg)
    output_directory(cfg.output, "output")
    dtype = None if cfg.dtype == "stored" else cfg.dtype
    model = load_with_tokenizer_files(source, cfg.output)
    out = save_hf(model, cfg.output, max_shard_size=cfg.max_shard_size, dtype=dtype)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, {cfg.dtype})")
    return out


def load_with_tokenizer_files(source: Path, output: Path):
    """The model in ``source`` (HF directory, as stored; or GGUF, dequantised to float32), with its tokenizer,
    chat template and generation config written to ``output`` (copied, or made from the GGUF metadata)."""
    if is_gguf(source):
        return _convert_gguf(source, output)
    model = load_hf(source, dtype="stored")
    _copy_tokenizer_files(source, output)
    return model


def _convert_gguf(source: Path, output: Path):
    """Load the GGUF model; write its tokenizer.json, chat template and generation_config.json to ``output``."""
    from lmstack.checkpoints.gguf import load_gguf, read_gguf
    from lmstack.checkpoints.gguf_tokenizer import gguf_stop_ids, gguf_tokenizer_json

    file = read_gguf(source)
    model = load_gguf(file, dtype="float32")
    tokenizer_json = gguf_tokenizer_json(file.metadata, str(source))
    tokenizer_from_json(tokenizer_json, source=str(source)).save(output)  # checked before it is written
    template = file.metadata.get("tokenizer.chat_template")
    if template:
        from lmstack.fileio import atomic_path

        with atomic_path(output / "chat_template.jinja") as tmp:
            tmp.write_text(template, encoding="utf-8")
    config = model.config
    stops = gguf_stop_ids(file.metadata)
    write_json(output / "generation_config.json",
               {"bos_token_id": config.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
                "pad_token_id": config.pad_token_id})
    return model


def _export_gguf(source: Path, cfg: ConvertConfig) -> Path:
    """SRC -> a GGUF file of tensor type --type, its tokenizer as metadata."""
    from lmstack.checkpoints.gguf import load_gguf, read_gguf
    from lmstack.checkpoints.gguf_export import copy_tokenizer_metadata, save_gguf, tokenizer_metadata
    from lmstack.fileio import read_json_object
    from lmstack.tokenizers import find_chat_template

    if cfg.dtype != "stored":
        raise ConfigError("--dtype applies to Hugging Face output; a GGUF file takes --type")
    output_directory(cfg.output.parent, "output's folder")
    if is_gguf(source):
        file = read_gguf(source)
        model, tokenizer = load_gguf(file, dtype="float32"), copy_tokenizer_metadata(file.metadata)
        name = str(file.metadata.get("general.name", source.stem))
    else:
        model, name = load_hf(source, dtype="float32"), source.name
        if not (source / "tokenizer.json").is_file():
            raise ConfigError(f"{source} has no tokenizer.json: a GGUF file needs the model's tokenizer")
        template = find_chat_template(source)
        tokenizer = tokenizer_metadata(read_json_object(source / "tokenizer.json", ConfigError), model.config,
                                       None if template.is_builtin else template.text)
    out = save_gguf(model, cfg.output, cfg.type.upper(), tokenizer, name=name)
    print(f"wrote {out} ({cfg.type}, {out.stat().st_size / 2**20:,.1f} MiB)")
    return out


def _copy_tokenizer_files(source: Path, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, output / name)
