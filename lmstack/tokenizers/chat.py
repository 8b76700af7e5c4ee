"""Chat templates: render {"role", "content"} messages with a Jinja template, as transformers does, and
mark which tokens belong to assistant turns (the tokens an SFT loss is computed on).

Models keep their template in one of three places, read in this order (``find_chat_template``):
``chat_template.jinja`` (transformers >= 5), ``tokenizer_config.json`` ("chat_template": a string, or a
list of named templates of which "default" is used) and, for GGUF files, ``tokenizer.chat_template``
(passed in by the GGUF reader). ChatML is the fallback only when a model has none, and the caller is told
(``ChatTemplate.source == "builtin ChatML"``). Rendering uses a sandboxed Jinja environment with
transformers' settings (trim_blocks, lstrip_blocks, loop controls, ``raise_exception``, ``tojson``,
``strftime_now``, the ``{% generation %}`` block), so a model's own template renders identically.
"""

import json
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmstack.errors import TokenizerError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_SOURCE = "builtin ChatML"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and where it came from (a file path, "GGUF tokenizer.chat_template", or the builtin)."""

    text: str
    source: str

    @property
    def is_builtin(self) -> bool:
        return self.source == BUILTIN_SOURCE


def _raise(message: str):
    raise TemplateError(message)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text for training; renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        body = caller()
        return f"{GENERATION_START}{body}{GENERATION_END}" if self.environment.mark_generation else body


# While encoding for training, ``{% generation %}`` bodies are wrapped in these private-use characters, then
# cut out again: the text between them is the assistant mask (transformers' return_assistant_tokens_mask).
GENERATION_START, GENERATION_END = "\ue000", "\ue001"
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


MAX_OUTPUT_CHARS = 4_000_000  # a rendered prompt longer than this is a runaway template
TIME_LIMIT_SECONDS = 5.0


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with ``*`` and ``**`` checked before they build a huge string, list or number."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            sized, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int) and len(sized) * count > MAX_OUTPUT_CHARS:
                raise TemplateError(f"a repetition of {len(sized)} x {count} exceeds the output limit")
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise TemplateError(f"the exponent {right} is too large")
        return super().call_binop(context, operator, left, right)


def _environment(mark_generation: bool = False) -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.mark_generation = mark_generation
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


def find_chat_template(directory, gguf_template: str | None = None) -> ChatTemplate:
    """The model's chat template: chat_template.jinja, then tokenizer_config.json, then ``gguf_template``;
    the builtin ChatML template only when there is none (check ``.is_builtin`` to tell the user).

    Raises:
        TokenizerError: a template file exists but cannot be read or holds no template string.
    """
    directory = Path(directory) if directory is not None else None
    if directory is not None:
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.is_file():
            try:
                return ChatTemplate(jinja_path.read_text(encoding="utf-8"), str(jinja_path))
            except (OSError, UnicodeDecodeError) as error:
                raise TokenizerError(f"{jinja_path}: cannot read ({error})") from None
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            template = _template_from_config(config_path)
            if template is not None:
                return ChatTemplate(template, str(config_path))
    if gguf_template:
        return ChatTemplate(gguf_template, "GGUF tokenizer.chat_template")
    return ChatTemplate(CHATML_TEMPLATE, BUILTIN_SOURCE)


def _template_from_config(path: Path) -> str | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: cannot read ({error})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{path}: chat_template must be a string or a list of named templates")
    return template


def load_chat_template(directory) -> str | None:
    """The template stored in ``directory`` (chat_template.jinja or tokenizer_config.json), or None."""
    found = find_chat_template(directory)
    return None if found.is_builtin else found.text


def render_chat(messages: list[dict], template: str | None = None, add_generation_prompt: bool = False,
                **variables) -> str:
    """The prompt text for ``messages``; extra ``variables`` (bos_token, tools, ...) reach the template."""
    return _render(messages, template, add_generation_prompt, False, variables)


def _render(messages: list[dict], template: str | None, add_generation_prompt: bool, mark_generation: bool,
            variables: dict) -> str:
    _check_messages(messages)
    try:
        compiled = _environment(mark_generation).from_string(template or CHATML_TEMPLATE)
        with _time_limit(TIME_LIMIT_SECONDS):
            pieces, size = [], 0
            for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **variables):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateError(f"the output passed {MAX_OUTPUT_CHARS:,} characters")
                pieces.append(piece)
        return "".join(pieces)
    except TemplateError as error:
        raise TokenizerError(f"chat template: {error}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:  # bad data in the template
        raise TokenizerError(f"chat template failed to render ({type(error).__name__}: {error})") from None


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt rendering after ``seconds`` (a template's loops are Python loops: a timer signal stops them).
    Only in the main thread, where signals are delivered; elsewhere the output limit still applies."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TemplateError(f"rendering took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class ChatEncoding:
    """ids: the prompt's token ids; assistant_mask: 1 where a token belongs to an assistant reply."""

    ids: list[int]
    assistant_mask: list[int]


def encode_chat(tokenizer, messages: list[dict], template: str | None = None, add_generation_prompt: bool = False,
                **variables) -> ChatEncoding:
    """Render and encode ``messages``, marking assistant tokens.

    A template with ``{% generation %}...{% endgeneration %}`` blocks says itself what the assistant
    wrote: exactly those characters are marked (transformers' and trl's assistant mask). Otherwise an
    assistant turn's content and what the template writes after it (its end marker) are marked, not the
    header before it; those spans are found by rendering the conversation one message longer at a time,
    so any template whose output for the first n messages is a prefix of its output for n + 1 works.
    Either way a token that straddles a span's edge is marked (transformers' rule).

    Raises:
        TokenizerError: the template is not prefix-stable, or a span boundary splits a token of a
            tokenizer that cannot give byte offsets.
    """
    if template is not None and _GENERATION_TAG.search(template):
        marked = _render(messages, template, add_generation_prompt, True, variables)
        return _encode_marked(tokenizer, _generation_pieces(marked))
    text = render_chat(messages, template, add_generation_prompt, **variables)
    pieces, start = [], 0
    for i, message in enumerate(messages):
        rendered = render_chat(messages[:i + 1], template, False, **variables)
        if not text.startswith(rendered):
            raise TokenizerError("chat template output is not prefix-stable; cannot locate assistant turns")
        end = len(rendered)
        segment = text[start:end]
        content_at = _content_offset(messages, i, template, variables, text, start, end)
        if content_at >= 0:
            pieces += [(segment[:content_at], 0), (segment[content_at:], 1)]
        else:
            pieces.append((segment, 0))
        start = end
    pieces.append((text[start:], 0))
    return _encode_marked(tokenizer, [(piece, flag) for piece, flag in pieces if piece])


_PROBE = "\x00lmstack-assistant-content\x00"


def _content_offset(messages: list[dict], i: int, template: str | None, variables: dict, text: str, start: int,
                    end: int) -> int:
    """Where assistant message ``i``'s content begins in ``text[start:end]`` (its rendered turn), or -1.

    The turn is rendered once more with the content replaced by a probe string: the probe's position is
    where the template writes the content, so a reply that also occurs in the header ("n" inside
    "assistant") is not mistaken for it. Templates that rewrite the content (``| trim``) make the probe
    and the real text disagree; then the first occurrence of the stripped content is taken."""
    message = messages[i]
    if message["role"] != "assistant" or not isinstance(message["content"], str) or not message["content"]:
        return -1
    probe = render_chat([*messages[:i], {**message, "content": _PROBE}], template, False, **variables)
    at = probe.find(_PROBE)
    if start <= at < end and text.startswith(message["content"], at):
        return at - start
    content = message["content"].strip()
    at = text.find(content, start, end) if content else -1
    return at - start if at >= 0 else -1


def _generation_pieces(marked: str) -> list[tuple[str, int]]:
    """(text, is_assistant) pieces of a render whose ``{% generation %}`` bodies are wrapped in markers."""
    pieces = []
    for i, part in enumerate(marked.split(GENERATION_START)):
        inside, _, after = part.partition(GENERATION_END) if i else ("", "", part)
        pieces += [(inside, 1), (after, 0)]
    return [(text, flag) for text, flag in pieces if text]


def _encode_marked(tokenizer, pieces: list[tuple[str, int]]) -> ChatEncoding:
    """Encode the whole text once and mark every token that overlaps a marked piece (transformers' rule:
    the tokens from the one holding a span's first character to the one holding its last). A token may
    straddle the boundary (" four" after "assistant:"); it is marked, as transformers marks it."""
    text = "".join(piece for piece, _ in pieces)
    ids = tokenizer.encode(text, add_special_tokens=False)
    ends = _token_byte_ends(tokenizer, ids)
    if ends is None or (ends and ends[-1] != len(text.encode("utf-8"))):
        return _encode_pieces(tokenizer, pieces)  # no byte offsets: spans must then fall on token boundaries
    spans, at = [], 0
    for piece, flag in pieces:
        size = len(piece.encode("utf-8"))
        if flag:
            spans.append((at, at + size))
        at += size
    starts = [0] + ends[:-1]
    mask = [int(any(s < end and start < e for s, e in spans)) for start, end in zip(starts, ends)]
    return ChatEncoding(ids, mask)


def _token_byte_ends(tokenizer, ids: list[int]) -> list[int] | None:
    """Cumulative UTF-8 byte length of the text after each token, or None if the tokenizer cannot tell."""
    if not hasattr(tokenizer, "byte_lengths") or not hasattr(tokenizer, "id_to_token"):
        return None
    lengths, ends, total = tokenizer.byte_lengths(), [], 0
    for i in ids:
        size = lengths[i] if i < len(lengths) else 0
        if size == 0:  # special tokens stand for their own text
            token = tokenizer.id_to_token.get(i) if isinstance(tokenizer.id_to_token, dict) else None
            size = len(token.encode("utf-8")) if token else 0
        total += size
        ends.append(total)
    return ends


def _encode_pieces(tokenizer, pieces: list[tuple[str, int]]) -> ChatEncoding:
    """Token ids and assistant mask of the concatenated pieces, checked against encoding the whole text."""
    text = "".join(piece for piece, _ in pieces)
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
