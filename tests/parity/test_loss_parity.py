"""The causal-LM loss (teacher forcing, ignore index) equals transformers' ``labels=`` loss on the same weights."""

import torch

from lmstack.checkpoints import load_hf
from lmstack.train import causal_lm_loss, next_token_targets
from tests.parity.hf_reference import make_hf_model, save_hf_model, transformers


def test_causal_lm_loss_matches_transformers(tmp_path):
    ref = make_hf_model(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    ours = load_hf(save_hf_model(ref, tmp_path))
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: not scored
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        theirs = ref(ids, attention_mask=mask, labels=labels).loss
        mine = causal_lm_loss(ours(ids, attention_mask=mask), next_token_targets(ids, mask))
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
