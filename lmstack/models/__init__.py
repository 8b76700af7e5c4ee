"""Models: configs, presets, the model kinds and the family registry (loading and saving files is
``lmstack.checkpoints``: ``load_hf``, ``save_hf``, ``load_model``; ``lmstack.load_hf`` works too).

    from lmstack.models import build_model
    model = build_model("gpt2")         # random init from a preset; logits = model(input_ids)
"""

import torch

from lmstack.errors import ConfigError
from lmstack.models.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig, MoEConfig
from lmstack.models.decoder import Block, Decoder
from lmstack.models.encoder import Encoder, EncoderOutput
from lmstack.models.encoder_decoder import EncoderDecoder
from lmstack.models.presets import PUBLISHED_PARAMETERS, get_preset, preset_names
from lmstack.models.registry import FAMILIES, Family, family_for_config, family_for_hf_config


MODEL_CLASSES = {DecoderConfig: Decoder, EncoderConfig: Encoder, EncoderDecoderConfig: EncoderDecoder}


def check_exportable(config) -> None:
    """Raise ConfigError if ``config`` cannot be written as a Hugging Face config.json that transformers
    reads back as the same model (e.g. a GPT-2 whose width is not n_heads x head_dim)."""
    from lmstack.models import hf_configs

    family = family_for_config(config)
    reason = hf_configs.expressible(family.config_from_hf, family.config_to_hf, config)
    if reason is not None:
        raise ConfigError(f"a {family.model_type} checkpoint cannot hold this config: {reason}")


def build_model(config: str | DecoderConfig | EncoderConfig | EncoderDecoderConfig, *,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> Decoder | Encoder | EncoderDecoder:
    """A randomly initialised model from a preset name or a config (its class picks the model kind)."""
    if isinstance(config, str):
        config = get_preset(config)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = MODEL_CLASSES[type(config)](config)
    return model.to(dtype)


__all__ = ["Block", "Decoder", "DecoderConfig", "Encoder", "EncoderConfig", "EncoderDecoder", "EncoderDecoderConfig",
           "EncoderOutput", "MoEConfig", "MODEL_CLASSES", "FAMILIES", "Family", "PUBLISHED_PARAMETERS", "build_model",
           "check_exportable", "family_for_config", "family_for_hf_config", "get_preset", "preset_names"]
