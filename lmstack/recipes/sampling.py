"""The decoding flags `lmstack generate` and `lmstack chat` share: how the model is opened and prepared,
and how the flags become a GenerationConfig."""

import functools

from lmstack.checkpoints import is_gguf
from lmstack.checkpoints.model_files import ModelFiles, open_model
from lmstack.errors import ConfigError
from lmstack.compress import quantize_
from lmstack.compress.files import load_any_model
from lmstack.compress.gguf_weights import load_gguf_quantized
from lmstack.generate import GenerationConfig
from lmstack.kernels import use_skinny_linears_
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.rag.chat import LanguageModel, LocalChat, ServerChat
from lmstack.recipes.configs.sampling import ChatModelOptions, SamplingOptions


def open_for_decoding(cfg: SamplingOptions) -> ModelFiles:
    """--model opened (an HF directory, a quantized directory or a GGUF file), quantized if --quantize asks,
    with the CPU decoding kernels swapped in."""
    path = resolve_model_dir(cfg.model)
    if cfg.quantize == "gguf" and not is_gguf(path):
        raise ConfigError(f"--quantize gguf keeps a GGUF file's quantized tensors; {cfg.model} is not a GGUF file")
    activations = None if cfg.activations == "none" else cfg.activations
    keep = functools.partial(load_gguf_quantized, activations=activations) if cfg.quantize == "gguf" else None
    files = open_model(path, hugepages=cfg.fast_kernels, load=load_any_model, load_gguf_file=keep)
    if cfg.quantize not in ("none", "gguf"):
        quantize_(files.model, cfg.quantize, group_size=cfg.group_size, activations=activations)
    prepare_for_decoding(files.model, cfg)
    return files


def open_chat_model(cfg: ChatModelOptions) -> LanguageModel:
    """--model loaded here (its sampling flags applied) or --server's running model (only --temperature sent;
    --do-sample alone samples at 1.0, as it does here)."""
    if cfg.server is not None:
        temperature = cfg.temperature if cfg.temperature is not None else 1.0 if cfg.do_sample else 0.0
        return ServerChat(cfg.server, temperature=temperature)
    files = open_for_decoding(cfg)
    return LocalChat(files, to_generation_config(cfg, eos_token_id=files.stop_ids))


def to_generation_config(cfg: SamplingOptions, *, num_beams: int = 1,
                         eos_token_id: list[int] | None = None) -> GenerationConfig:
    """The decoding options the flags ask for (sampling switches on when a sampling knob is given)."""
    sampling_knobs = (cfg.temperature, cfg.top_k, cfg.top_p)
    do_sample = cfg.do_sample if cfg.do_sample is not None else any(k is not None for k in sampling_knobs)
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=do_sample,
        temperature=1.0 if cfg.temperature is None else cfg.temperature,
        top_k=0 if cfg.top_k is None else cfg.top_k, top_p=1.0 if cfg.top_p is None else cfg.top_p,
        num_beams=num_beams, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
        eos_token_id=eos_token_id or None)


def prepare_for_decoding(model, cfg: SamplingOptions):
    """The model with the CPU decoding kernels swapped in when asked for and useful (CPU weights)."""
    if cfg.fast_kernels and next(model.parameters()).device.type == "cpu":
        use_skinny_linears_(model)
    return model
