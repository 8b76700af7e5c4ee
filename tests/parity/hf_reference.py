"""Helpers building random-init reference models with `transformers` (offline, from config objects)."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")


def make_hf_model(config, seed: int = 0):
    """A random-init transformers causal LM in fp32 eval mode.

    The default init (std 0.02) makes attention almost uniform, so logits barely depend on positions or
    masks and a wrong RoPE or window could hide under the tolerance. Weights are redrawn at unit gain
    (std ~ 1/sqrt(fan_in)) so attention is peaked, and biases and norm weights are randomised too, so a
    mapping mistake on any tensor shows up in the logits.
    """
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return randomize_(model)


def randomize_(model):
    """Redraw every weight as ``make_hf_model`` describes (any transformers model); returns it."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
                continue
            if isinstance(module, torch.nn.Embedding):
                weight.normal_(std=1.0)
            else:  # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)
                fan_in = weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]
                weight.normal_(std=1.5 / fan_in**0.5)
        for name, param in model.named_parameters():
            if param.dim() == 3:  # experts stacked in one tensor (E, out, in): each expert its own draw
                param.normal_(std=1.5 / param.shape[2]**0.5)
            if param.dim() == 1:
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
    return model


def save_hf_model(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def load_reference(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def tiny_gqa_llama_dir(tmp_path_factory) -> Path:
    """A saved random-init Llama with grouped-query attention (vocab 128, width 64, 2 layers, 4 q / 2 kv heads)."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return save_hf_model(make_hf_model(config), tmp_path_factory.mktemp("base"))
