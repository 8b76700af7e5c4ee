"""Typed configs: YAML + dotted overrides -> validated dataclasses, with errors naming the key."""

import argparse
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Literal

import pytest

from lmstack.config import (add_arguments, apply_overrides, field, from_dict, from_namespace, load_yaml, resolve,
                            save_yaml, to_dict)
from lmstack.errors import ConfigError


@dataclass
class Optim:
    lr: float = field(3e-4, help="learning rate")
    schedule: Literal["cosine", "constant"] = field("cosine", help="learning-rate schedule")


@dataclass
class Train:
    max_steps: int = field(100, help="optimizer steps")
    optim: Optim = dc_field(default_factory=Optim)
    out: Path = field(Path("runs/x"), help="output directory")
    tags: list[str] = dc_field(default_factory=list)
    resume: bool = field(False, help="continue from the last checkpoint")
    seed: int | None = field(None, help="random seed")


def test_yaml_plus_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 10\noptim:\n  lr: 0.001\ntags: [a, b]\n")
    cfg = resolve(Train, tmp_path / "c.yaml", {"optim.schedule": "constant", "max_steps": "200", "seed": "7"})
    assert cfg == Train(max_steps=200, optim=Optim(lr=0.001, schedule="constant"), tags=["a", "b"], seed=7)


def test_round_trip_through_yaml(tmp_path):
    cfg = Train(max_steps=5, optim=Optim(lr=1e-3), out=Path("o"), tags=["x"], resume=True)
    save_yaml(cfg, tmp_path / "resolved.yaml")
    assert from_dict(Train, load_yaml(tmp_path / "resolved.yaml")) == cfg
    assert to_dict(cfg)["out"] == "o"


@pytest.mark.parametrize("data, message", [
    ({"max_step": 3}, "unknown config key 'max_step'; did you mean 'max_steps'"),
    ({"optim": {"lrr": 1.0}}, "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ({"max_steps": "many"}, "config key 'max_steps' must be int, got 'many'"),
    ({"max_steps": 2.5}, "config key 'max_steps' must be int"),
    ({"resume": "yes"}, "config key 'resume' must be bool"),
    ({"optim": {"schedule": "linear"}}, "config key 'optim.schedule' is 'linear'; expected one of"),
    ({"optim": 3}, "optim: expected a mapping"),
    ({"tags": "a"}, "config key 'tags' must be a list"),
    ({"max_steps": None}, "config key 'max_steps' must not be null"),
])
def test_bad_keys_and_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_dict(Train, data)


def test_override_errors_and_typing():
    assert apply_overrides({}, {"optim.lr": "1e-3", "tags": "[a, b]"}) == {"optim": {"lr": 1e-3}, "tags": ["a", "b"]}
    from lmstack.config import Verbatim
    kept = apply_overrides({}, {"prompt": Verbatim("Answer: yes")})
    assert kept == {"prompt": "Answer: yes"} and type(kept["prompt"]) is str
    with pytest.raises(ConfigError, match="'max_steps' is not a section"):
        apply_overrides({"max_steps": 3}, {"max_steps.x": "1"})


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot read YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_yaml(tmp_path / "list.yaml")


def test_nested_sections_become_dotted_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Train)
    args = parser.parse_args(["--max-steps", "9", "--optim.lr", "0.5", "--optim.schedule", "constant", "--resume"])
    cfg = from_namespace(Train, args)
    assert cfg.max_steps == 9 and cfg.optim == Optim(lr=0.5, schedule="constant") and cfg.resume is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--optim.schedule", "linear"])
