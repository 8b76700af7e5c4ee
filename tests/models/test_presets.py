"""Presets: published parameter counts, agreement with transformers' own count, and HF round trips."""

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.models import PUBLISHED_PARAMETERS, build_model, family_for_config, get_preset, preset_names
from lmstack.models.hf_configs import expressible


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_published_figure(name):
    model = build_model(get_preset(name), device="meta")
    assert model.num_parameters() == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", ["gpt2", "llama-3.2-1b", "mistral-7b", "qwen2-0.5b", "smollm2-135m"])
def test_transformers_counts_the_same_from_our_config_json(name):
    transformers = pytest.importorskip("transformers")
    config = get_preset(name)
    family = family_for_config(config)
    hf_config = transformers.AutoConfig.for_model(**family.config_to_hf(config))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in reference.parameters()) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_expressible_in_its_family(name):
    config = get_preset(name)
    family = family_for_config(config)
    assert expressible(family.config_from_hf, family.config_to_hf, config) is None


@pytest.mark.parametrize("name", ["bert-base", "t5-small"])
def test_transformers_counts_the_same_for_encoder_presets(name):
    transformers = pytest.importorskip("transformers")
    config = get_preset(name)
    hf_config = transformers.AutoConfig.for_model(**family_for_config(config).config_to_hf(config))
    cls = transformers.BertModel if name == "bert-base" else transformers.T5ForConditionalGeneration
    with torch.device("meta"):
        reference = cls(hf_config)
    assert sum(p.numel() for p in reference.parameters()) == PUBLISHED_PARAMETERS[name]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'.*gpt2"):
        get_preset("gpt3")
