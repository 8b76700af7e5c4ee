"""Prompt tuning (Lester et al., 2021): P learned input embeddings in front of every sequence.

    inputs_embeds = prompt (P, C) ++ embed_tokens(input_ids)     (B, P + T, C), positions 0 .. P+T-1
    hidden_states -> the caller's T tokens only                    (B, T, C)

The table is peft's ``prompt_embeddings`` (P, C), so files are interchangeable. It starts from the
embeddings of an initialisation text's tokens (repeated or cut to P, as peft's ``TEXT`` init) or, by
default, of P tokens drawn from the vocabulary (peft's ``SAMPLE_VOCAB``; plain N(0, 1) rows sit far
from any real embedding). An encoder's head reads the full sequence, as peft's: a sequence classifier
pools the first virtual token; token-level outputs keep the caller's tokens.

While decoding, the first call (an empty cache) runs the prompt; later calls only shift positions and
the mask, its P slots being in the cache already.
"""

import math

import torch
from torch import nn

from lmstack.nn.embedding import embed_inputs
from lmstack.peft.adapted import materialize_
from lmstack.peft.virtual_tokens import VirtualTokensModel, call_tokens, virtual_device


class PromptTuningModel(VirtualTokensModel):
    """Mixed in before a Decoder's or Encoder's class by ``apply_prompt_tuning``."""

    transform_name = "prompt tuning"

    def add_prompt(self, init_token_ids: list[int] | None) -> None:
        self.prompt_init_ids = list(init_token_ids) if init_token_ids else None
        self.prompt_embeddings = nn.Embedding(self.num_virtual_tokens, self.config.dim, device=virtual_device(self))
        if not self.prompt_embeddings.weight.is_meta:
            self.initialize_added_()

    def added_tensors(self) -> list[str]:
        return ["prompt_embeddings.weight"]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings.weight": self.prompt_embeddings.weight}

    def initialize_added_(self) -> None:
        """Rows of the (loaded) token embeddings: the init text's tokens, or tokens drawn at random."""
        materialize_(self.prompt_embeddings, virtual_device(self))
        P, ids = self.num_virtual_tokens, self.prompt_init_ids
        if ids:
            ids = (ids * math.ceil(P / len(ids)))[:P]  # peft's TEXT init: repeat, then cut to P
            ids = torch.tensor(ids, device=virtual_device(self))
        else:
            ids = torch.randint(0, self.config.vocab_size, (P,), device=virtual_device(self))
        with torch.no_grad():
            self.prompt_embeddings.weight.copy_(self.embed_tokens(ids).to(self.prompt_embeddings.weight.dtype))

    def forward(self, *args, **kwargs):
        """The base model's forward. An encoder's head sees the virtual tokens too (its 3-D outputs are cut
        back to the caller's tokens); a decoder's logits cover the caller's tokens (B, T, V)."""
        head_outputs = getattr(self, "head_outputs", None)
        if head_outputs is None or not self.adapter_enabled:
            return super().forward(*args, **kwargs)
        out = head_outputs(self._run(self._bind(args, kwargs), keep_virtual=True))
        for name, value in vars(out).items():
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                setattr(out, name, value[:, self.num_virtual_tokens:])
        return out

    def _run(self, call: dict, keep_virtual: bool = False) -> torch.Tensor:
        P = self.num_virtual_tokens
        tokens = call_tokens(call)
        B, device = tokens.shape[0], tokens.device
        cache = call.get("kv_cache")
        positions = call.get("position_ids")
        self._widen(call, B, device)
        if cache is not None and cache.length > 0:  # decoding: the prompt is in the cache already
            return self._base_hidden_states(**call)
        embeds = embed_inputs(self.embed_tokens, call.pop("input_ids"), call.pop("inputs_embeds"))
        prompt = self.prompt_embeddings.weight.to(embeds.dtype).expand(B, -1, -1)
        call["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        call["input_ids"] = None
        if positions is not None:  # the virtual tokens take 0 .. P-1; _widen moved the caller's by P
            virtual = torch.arange(P, device=device).expand(B, P)
            call["position_ids"] = torch.cat([virtual, call["position_ids"]], dim=1)
        if call.get("token_type_ids") is not None:
            types = call["token_type_ids"]
            call["token_type_ids"] = torch.cat([torch.zeros(B, P, dtype=types.dtype, device=device), types], dim=1)
        hidden = self._base_hidden_states(**call)
        return hidden if keep_virtual else hidden[:, P:]

    def remove_adapter(self) -> None:
        del self.prompt_embeddings
        for name in ("num_virtual_tokens", "adapter_enabled", "prompt_init_ids"):
            self.__dict__.pop(name, None)
