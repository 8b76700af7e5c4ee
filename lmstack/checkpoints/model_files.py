"""Everything a chat or generation job needs from one model path: the model, its tokenizer, its chat
template and the tokens that end a turn, from a Hugging Face-format directory or a GGUF file.

    files = open_model("model.gguf")           # or a directory
    files.model, files.tokenizer, files.chat_template, files.stop_ids
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmstack.checkpoints import is_gguf, load_model
from lmstack.errors import CheckpointError
from lmstack.nn.memory import move_to_hugepages_
from lmstack.tokenizers import (ChatTemplate, NoTokenizerError, find_chat_template, load_tokenizer, render_chat,
                                tokenizer_from_json)

# Special tokens that end an assistant turn in the major chat formats, stopped at when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
                      "<|end_of_text|>", "<|eom_id|>")


@dataclass
class ModelFiles:
    """A loaded model with what it was shipped with."""

    path: Path
    model: nn.Module
    tokenizer: object | None  # a Tokenizer / WordPieceTokenizer, or None when the model has none
    chat_template: ChatTemplate
    stop_ids: list[int] = field(default_factory=list)  # generation ends at any of these

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` in this model's chat template, with the model's own BOS / EOS
        token text where the template writes ``{{ bos_token }}`` / ``{{ eos_token }}`` (else nothing)."""
        names = {}
        for key in ("bos_token", "eos_token"):
            token_id = getattr(self.model.config, f"{key}_id", None)
            token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
            names[key] = self.tokenizer.id_to_token.get(token_id, "") if isinstance(token_id, int) else ""
        return render_chat(messages, self.chat_template.text, add_generation_prompt=add_generation_prompt, **names)


def open_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
               hugepages: bool = False, load: Callable[..., nn.Module] = load_model,
               load_gguf_file: Callable[..., nn.Module] | None = None) -> ModelFiles:
    """Load the model at ``path`` (directory or .gguf) with its tokenizer, chat template and stop tokens.
    With ``hugepages``, the linear layers' CPU weights are moved into huge-page memory (for decoding),
    while the tokenizer is being built. ``load(path, device=, dtype=)`` loads a directory's model
    (``lmstack.compress.files.load_any_model`` also reads quantized directories); ``load_gguf_file(file)``,
    if given, loads a parsed GGUF file instead of the fp32 import (``lmstack.compress.gguf_weights``).

    Raises:
        CheckpointError, ConfigError, TokenizerError: unreadable files, naming them.
    """
    path = Path(path)
    if is_gguf(path):
        from lmstack.checkpoints.gguf import load_gguf, read_gguf
        from lmstack.checkpoints.gguf_tokenizer import gguf_stop_ids, gguf_tokenizer_json

        file = read_gguf(path)
        metadata = file.metadata
        # The tokenizer is built (pure Python) while the weights dequantise (compiled code or numpy, both of
        # which release the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer = pool.submit(lambda: tokenizer_from_json(gguf_tokenizer_json(metadata, str(path)),
                                                                source=str(path)))
            model = load_gguf(file, device=device, dtype=dtype) if load_gguf_file is None else load_gguf_file(file)
            tokenizer = tokenizer.result()
        template = find_chat_template(None, metadata.get("tokenizer.chat_template"))
        stops = gguf_stop_ids(metadata)
    else:
        model = load(path, device=device, dtype=dtype)
        with ThreadPoolExecutor(max_workers=1) as pool:  # the copy releases the GIL; tokenizer building holds it
            if hugepages:
                moving = pool.submit(move_to_hugepages_, [m.weight for m in model.modules() if isinstance(m, nn.Linear)])
            try:
                tokenizer = load_tokenizer(path)
            except NoTokenizerError:
                tokenizer = None
            if hugepages:
                moving.result()
        template = find_chat_template(path)
        stops = _generation_config_eos(path)
    stops += _as_list(getattr(model.config, "eos_token_id", None))
    if tokenizer is not None:
        stops += [i for t in END_OF_TURN_TOKENS if (i := tokenizer.token_to_id(t)) is not None
                  and _is_special(tokenizer, i)]
    return ModelFiles(path, model, tokenizer, template, list(dict.fromkeys(stops)))


def _generation_config_eos(directory: Path) -> list[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read ({error})") from None
    return _as_list(data.get("eos_token_id")) if isinstance(data, dict) else []


def _as_list(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _is_special(tokenizer, token_id: int) -> bool:
    is_special = getattr(tokenizer, "is_special", None)
    return bool(is_special(token_id)) if is_special is not None else True
