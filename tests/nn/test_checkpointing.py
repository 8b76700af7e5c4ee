"""Activation checkpointing recomputes blocks in backward: same loss and gradients (dropout included), same
names, and nothing changes outside training."""

import copy

import torch

from lmstack.models import build_model
from lmstack.models.presets import get_preset
from lmstack.nn.checkpointing import checkpoint_layers_


def test_checkpointed_blocks_give_the_same_gradients():
    plain = build_model(get_preset("tiny-llama").replace(dropout=0.1), seed=0).train()
    checkpointed = checkpoint_layers_(copy.deepcopy(plain))
    assert type(checkpointed.layers[0]).__name__.startswith("Checkpointed")
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # the same dropout masks; the recomputation replays them
        loss = model(ids).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(checkpointed.eval()(ids), plain.eval()(ids))
