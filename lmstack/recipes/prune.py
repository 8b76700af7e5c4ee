"""`lmstack prune SRC DST`: a pruned copy of a decoder checkpoint, in Hugging Face format.

    lmstack prune smollm2-135m-instruct runs/smollm2-wanda --method wanda --sparsity 0.5
    lmstack prune runs/quickstart/model runs/qs-2of4 --method sparsegpt --pattern 2:4
    lmstack prune runs/quickstart/model runs/qs-half --method none --heads 0.5 --channels 0.5
    lmstack finetune --task causal_lm --model.path runs/qs-half --data.train ... --out runs/qs-half-ft

Structured pruning (``--heads``, ``--channels``, ``--layers``; ``lmstack.compress.prune_structured``) runs
first and makes the model smaller; then ``--method`` zeroes weights of its linears (``lmstack.compress.prune_``:
a fraction, or an N:M pattern). DST gets config.json (the smaller shapes, plus ``pruning_config``: what was
done), model.safetensors and the tokenizer files, and ``sparsity.txt``: the per-layer report printed at the
end. Wanda, SparseGPT, the calibrated importances and ``--layers`` read ``calibration_tokens`` tokens of
calibration text. Everything is written beside DST and moved in at the end: a failed run leaves DST as it was.
"""

from pathlib import Path

from tqdm import tqdm

from lmstack.checkpoints import save_hf
from lmstack.compress import prune_, prune_structured, quantized_bytes, sparsity_report
from lmstack.compress.settings import write_pruning_record
from lmstack.errors import ConfigError
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.prune import PruneConfig
from lmstack.recipes.convert import load_with_tokenizer_files, staged_output
from lmstack.recipes.quantize import calibration_batches
from lmstack.tokenizers import NoTokenizerError, load_tokenizer

def needs_calibration(cfg: PruneConfig) -> bool:
    structured = bool(cfg.heads or cfg.channels or cfg.layers)
    return cfg.method in ("wanda", "sparsegpt") or cfg.layers > 0 or (structured and cfg.importance != "magnitude")


def _prune_into(work: Path, source: Path, cfg: PruneConfig):
    """Load, prune and save into ``work``; returns (model, size before in bytes, report)."""
    model = load_with_tokenizer_files(source, work).float().eval()
    if not hasattr(model, "layers") or not hasattr(model, "lm_head"):
        raise ConfigError(f"{cfg.source}: lmstack prune takes a decoder; this checkpoint holds a {type(model).__name__}")
    before = quantized_bytes(model)
    calibration = None
    if needs_calibration(cfg):
        try:
            tokenizer = load_tokenizer(work)
        except NoTokenizerError:
            raise ConfigError(f"{cfg.source}: this pruning needs the model's tokenizer for calibration text") from None
        calibration = calibration_batches(cfg, tokenizer)
    record = {}
    if cfg.heads or cfg.channels or cfg.layers:
        model = prune_structured(model, heads=cfg.heads, channels=cfg.channels, layers=cfg.layers,
                                 importance=cfg.importance, calibration=calibration)
        record["structured"] = model.pruning
    if cfg.method != "none":
        with tqdm(desc=f"pruning ({cfg.method})", unit="layer") as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            prune_(model, cfg.method, cfg.sparsity, pattern=cfg.pattern, scope=cfg.scope, calibration=calibration,
                   progress=progress)
        record.update(model.pruning)
    else:
        record["method"] = "none"
    save_hf(model, work)
    write_pruning_record(work, record)
    report = sparsity_report(model)
    (work / "sparsity.txt").write_text(report + "\n", encoding="utf-8")
    return model, before, report


def run(cfg: PruneConfig) -> Path:
    source = resolve_model_dir(cfg.source)
    with staged_output(source, cfg.output) as work:  # a failed run leaves nothing in the output directory
        model, before, report = _prune_into(work, source, cfg)
    print(report)
    after = quantized_bytes(model)
    print(f"wrote {cfg.output}: {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB of weights"
          + ("" if cfg.method == "none" else " (zeros are stored: unstructured sparsity does not shrink the file)"))
    return cfg.output
