"""`lmstack quantize SRC DST --scheme int8|int4|nf4|gptq|awq`: a quantized copy of a checkpoint.

    lmstack quantize smollm2-135m-instruct runs/smollm2-int4 --scheme gptq --group-size 64
    lmstack generate --model runs/smollm2-int4 --prompt "The capital of France is"

Loads SRC (HF directory or GGUF, dequantised to float32), swaps its linears for quantized ones with
``lmstack.compress.quantize_`` (a progress bar over layers), and writes DST: the packed tensors and
config.json with its ``quantization_config`` (``lmstack.compress.files``), plus the tokenizer files. GPTQ and
AWQ draw ``calibration_tokens`` tokens of calibration text in windows of ``calibration_seq_len``.
"""

import random
from pathlib import Path

import torch
from tqdm import tqdm

from lmstack.compress import quantize_, quantized_bytes
from lmstack.compress.files import save_quantized
from lmstack.data import read_documents, resolve_sources
from lmstack.errors import ConfigError, DataError
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.quantize import QuantizeConfig
from lmstack.recipes.convert import load_with_tokenizer_files, staged_output
from lmstack.tokenizers import NoTokenizerError, load_tokenizer


def calibration_batches(cfg: QuantizeConfig, tokenizer) -> list[torch.Tensor]:
    """(1, calibration_seq_len) token windows, ``calibration_tokens`` in all, drawn at seeded random offsets.

    Raises:
        DataError: the text holds fewer tokens than asked for.
    """
    ids = [i for doc in read_documents(resolve_sources(cfg.calibration)) for i in tokenizer.encode(doc.text)]
    if len(ids) < cfg.calibration_tokens:
        raise DataError(f"calibration text {cfg.calibration} holds {len(ids):,} tokens; "
                        f"--calibration-tokens asks for {cfg.calibration_tokens:,}")
    windows = cfg.calibration_tokens // cfg.calibration_seq_len
    rng = random.Random(cfg.seed)
    starts = [rng.randrange(0, len(ids) - cfg.calibration_seq_len + 1) for _ in range(windows)]
    return [torch.tensor([ids[s:s + cfg.calibration_seq_len]]) for s in starts]


def _quantize_into(work: Path, source: Path, cfg: QuantizeConfig) -> tuple[torch.nn.Module, int]:
    """Load, quantize and save into ``work``; returns the model and its fp32 size in bytes."""
    model = load_with_tokenizer_files(source, work).float().eval()
    size_before = quantized_bytes(model)
    calibration = None
    if cfg.scheme in ("gptq", "awq"):
        try:
            tokenizer = load_tokenizer(work)
        except NoTokenizerError:
            raise ConfigError(f"{cfg.source}: {cfg.scheme} needs the model's tokenizer for calibration text") from None
        calibration = calibration_batches(cfg, tokenizer)
    with tqdm(desc=f"quantizing ({cfg.scheme})", unit="layer") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        quantize_(model, cfg.scheme, group_size=cfg.group_size, lm_head=cfg.lm_head, calibration=calibration,
                  activations=None if cfg.activations == "none" else cfg.activations, embedding=cfg.embedding,
                  progress=progress)
    save_quantized(model, work)
    return model, size_before


def run(cfg: QuantizeConfig) -> Path:
    source = resolve_model_dir(cfg.source)
    with staged_output(source, cfg.output) as work:  # a failed run leaves nothing in the output directory
        model, before = _quantize_into(work, source, cfg)
    after = quantized_bytes(model)
    print(f"wrote {cfg.output} ({cfg.scheme}): {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB "
          f"({before / after:.1f}x smaller)")
    return cfg.output
