"""`lmstack chat`: talk to an instruct model in the terminal, or answer one --message for scripts.

    lmstack chat --model smollm2-135m-instruct                      # interactive: /reset, /exit
    lmstack chat --model DIR|FILE.gguf --message "Hi" --system "Be brief."

Each turn renders the whole conversation with the model's own chat template (chat_template.jinja,
tokenizer_config.json or the GGUF's; the built-in ChatML only when it has none, and then it says so),
streams the reply until an end-of-turn or EOS token, and keeps it in the history. Special tokens are never
printed (--show-special prints them). When the conversation outgrows the context, the oldest exchanges
are dropped (the system message stays).
"""

import sys
from dataclasses import dataclass, field as dataclass_field
from typing import Iterator

import torch

from lmstack.checkpoints.model_files import ModelFiles
from lmstack.errors import ConfigError
from lmstack.generate import stream
from lmstack.recipes.sampling import open_for_decoding, to_generation_config
from lmstack.recipes.configs.chat import ChatConfig

PROMPT = "you> "


@dataclass
class ChatSession:
    """A conversation with one model: its history and how each reply is produced."""

    files: ModelFiles
    options: ChatConfig
    messages: list[dict] = dataclass_field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.options.system}] if self.options.system else []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to ``text`` (pieces of text), then record it in the history."""
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        config = to_generation_config(self.options, eos_token_id=self.files.stop_ids)
        pieces = []
        for piece in stream(self.files.model, ids, config, tokenizer=self.files.tokenizer,
                            skip_special_tokens=not self.options.show_special):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def _prompt_ids(self) -> torch.Tensor:
        """(1, T) ids of the rendered conversation, dropping the oldest exchanges until it fits."""
        limit = getattr(self.files.model.config, "context_limit", None)
        while True:
            ids = self.files.tokenizer.encode(self._render(), add_special_tokens=False)
            if limit is None or len(ids) + self.options.max_new_tokens <= limit:
                return torch.tensor([ids], dtype=torch.long)
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                raise ConfigError(f"the message ({len(ids)} tokens) and --max-new-tokens "
                                  f"{self.options.max_new_tokens} exceed the model's context of {limit} tokens")
            del self.messages[first:first + 2]  # the oldest user turn and its reply

    def _render(self) -> str:
        return self.files.render_chat(self.messages)


def run(cfg: ChatConfig) -> list[dict]:
    files = open_for_decoding(cfg)
    if files.tokenizer is None:
        raise ConfigError(f"{cfg.model}: chat needs a tokenizer (tokenizer.json, vocab.json + merges.txt, or a "
                          "GGUF file's own)")
    if files.chat_template.is_builtin:
        print(f"note: {cfg.model} has no chat template; using the built-in ChatML template", file=sys.stderr)
    session = ChatSession(files, cfg)
    if cfg.message is not None:
        _print_reply(session, cfg.message)
        return session.messages
    _interactive(session)
    return session.messages


def _print_reply(session: ChatSession, text: str) -> None:
    for piece in session.reply(text):
        print(piece, end="", flush=True)
    print(flush=True)


def _interactive(session: ChatSession) -> None:
    print("chat: type a message; /reset starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            _print_reply(session, line)
        except KeyboardInterrupt:  # stop this reply, keep the session
            print("\n(interrupted)", file=sys.stderr)
            session.messages.pop()
