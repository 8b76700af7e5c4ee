"""Chat templates: render {"role", "content"} messages with a Jinja template, as transformers does, and
mark which tokens belong to assistant turns (the tokens an SFT loss is computed on).

The template comes from ``tokenizer_config.json`` ("chat_template") or is the built-in ChatML default.
Rendering uses a sandboxed Jinja environment with the same settings as transformers (trim_blocks,
lstrip_blocks, ``raise_exception``), so a model's own template renders identically.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmstack.tokenizers.bpe import TokenizerError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise(message: str):
    raise TokenizerError(f"chat template: {message}")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env


def load_chat_template(directory) -> str | None:
    """The "chat_template" of ``directory/tokenizer_config.json`` (the "default" one if several), or None."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: cannot read ({error})") from None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def render_chat(messages: list[dict], template: str | None = None, add_generation_prompt: bool = False,
                **variables) -> str:
    """The prompt text for ``messages``; extra ``variables`` (bos_token, tools, ...) reach the template."""
    _check_messages(messages)
    try:
        compiled = _environment().from_string(template or CHATML_TEMPLATE)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as error:
        raise TokenizerError(f"chat template: {error}") from None


@dataclass
class ChatEncoding:
    """ids: the prompt's token ids; assistant_mask: 1 where a token belongs to an assistant reply."""

    ids: list[int]
    assistant_mask: list[int]


def encode_chat(tokenizer, messages: list[dict], template: str | None = None, add_generation_prompt: bool = False,
                **variables) -> ChatEncoding:
    """Render and encode ``messages``, marking assistant tokens: an assistant turn's content and what the
    template writes after it (its end marker), not the header before it.

    Spans are found by rendering the conversation one message longer at a time, so any template whose
    output for the first n messages is a prefix of its output for n + 1 works.

    Raises:
        TokenizerError: the template is not prefix-stable, or a span boundary splits a token.
    """
    text = render_chat(messages, template, add_generation_prompt, **variables)
    pieces, start = [], 0
    for i, message in enumerate(messages):
        rendered = render_chat(messages[:i + 1], template, False, **variables)
        if not text.startswith(rendered):
            raise TokenizerError("chat template output is not prefix-stable; cannot locate assistant turns")
        end = len(rendered)
        segment = text[start:end]
        content_at = segment.find(message["content"]) if message["role"] == "assistant" else -1
        if content_at >= 0:
            pieces += [(segment[:content_at], 0), (segment[content_at:], 1)]
        else:
            pieces.append((segment, 0))
        start = end
    pieces.append((text[start:], 0))
    ids, mask = [], []
    for piece, is_assistant in pieces:
        piece_ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
        ids += piece_ids
        mask += [is_assistant] * len(piece_ids)
    if ids != tokenizer.encode(text, add_special_tokens=False):
        raise TokenizerError("an assistant turn boundary falls inside a token; the mask would be misaligned")
    return ChatEncoding(ids, mask)


def _check_messages(messages: list[dict]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TokenizerError(f"message {i} must be a dict with 'role' and 'content'")
