"""Training objectives: ``objective(model, batch) -> (loss, metrics)``; adding one never touches the loop.

Causal LM with teacher forcing: the model reads tokens 0..T-1 and is scored on predicting tokens 1..T.
Targets equal to IGNORE_INDEX (padding, prompt tokens) are left out of the mean.

``linear_cross_entropy`` fuses the LM head with the loss: with a large vocabulary the (tokens, vocab)
logits dominate a step's memory traffic, and log-softmax forward + backward + the one-hot gradient cost
three passes of exponentials and fills over them (measured: ~25% of a GPT-2-vocabulary step on CPU).
It walks the tokens in chunks, computes each chunk's softmax once, and turns it into the gradients of
the hidden states and the head weight right away (as Liger-Kernel's fused linear cross-entropy does);
the full logits never exist.
"""

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.data.collate import IGNORE_INDEX
from lmstack.nn.moe import Routing, load_balancing_loss, router_z_loss, routing_stats


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside the block; the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for teacher forcing from unshifted ids: targets[:, t] = input_ids[:, t + 1]; the last
    position and positions whose next token is padding get IGNORE_INDEX. (B, T) -> (B, T)."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        targets[:, :-1] = targets[:, :-1].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return targets


def labelled_items(labels: torch.Tensor) -> int:
    """How many positions of ``labels`` are scored (not IGNORE_INDEX): what a mean cross-entropy averages over."""
    return int((labels != IGNORE_INDEX).sum())


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against next-token targets (B, T), in fp32, ignoring IGNORE_INDEX.

    reduction "mean" (over scored tokens) or "sum" (nats, for exact averages across batches)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        n_scored = (targets != IGNORE_INDEX).sum()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        # A frozen head (LoRA, QLoRA) needs no weight gradient: that matmul is a third of this function's work.
        wants_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            valid = t != IGNORE_INDEX
            safe = t.masked_fill(~valid, 0)[:, None]
            probs = (h @ weight.T).float()  # (n, V): becomes the gradient in place
            target_logit = probs.gather(1, safe)
            row_max = probs.amax(-1, keepdim=True)
            probs.sub_(row_max).exp_()
            row_sum = probs.sum(-1, keepdim=True)
            total += ((row_sum.log() + row_max - target_logit).squeeze(1) * valid).sum()
            probs.div_(row_sum)
            probs.scatter_add_(1, safe, -valid[:, None].to(probs.dtype))  # softmax - one_hot(target)
            probs.mul_((valid / n_scored)[:, None])  # d(mean loss)/d(logits); ignored rows get 0
            grad_hidden[start:start + chunk_rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if wants_weight:
                grad_weight.addmm_(probs.T, h.float())
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if wants_weight else None)
        return total / n_scored

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, None if grad_weight is None else grad_weight * grad_loss, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """``causal_lm_loss(hidden @ weight.T, targets)`` without materialising the logits.

    Args:
        hidden: (N, C) final hidden states; weight: (V, C) the LM head; targets: (N,) ids or IGNORE_INDEX.
        chunk_rows: tokens per chunk (default: about 16M logits at a time).
    Returns:
        the mean loss over scored tokens (a scalar; NaN if none is scored, as F.cross_entropy gives).
    """
    chunk_rows = chunk_rows or max(1, 2**24 // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


def evaluate_lm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                token_bytes: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out next-token loss (nats/token), perplexity and, given the UTF-8 byte length of each token id
    (V,), bits per byte = total nats / ln 2 / bytes of the predicted text (comparable across tokenizers)."""
    device = next(model.parameters()).device
    nats, tokens, n_bytes = 0.0, 0, 0
    with evaluating(model):
        for batch in batches:
            inputs, targets, extra = _unpack(batch)
            inputs, targets = inputs.to(device), targets.to(device)
            extra = {k: v.to(device) for k, v in extra.items()}
            nats += float(causal_lm_loss(model(inputs, **extra), targets, reduction="sum"))
            scored = targets[targets != IGNORE_INDEX]
            tokens += scored.numel()
            if token_bytes is not None:
                n_bytes += int(token_bytes.to(device)[scored].sum())
    if tokens == 0:
        return {}
    loss = nats / tokens
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if token_bytes is not None and n_bytes:
        result["eval_bpb"] = nats / math.log(2) / n_bytes
    return result


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(inputs, targets, model keyword arguments) of an (inputs, targets) pair or a dict batch with
    input_ids, labels (next-token targets) and optionally attention_mask / position_ids (SFT, packed rows)."""
    if isinstance(batch, dict):
        extra = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
        return batch["input_ids"], batch["labels"], extra
    inputs, targets = batch
    return inputs, targets, {}


class CausalLMObjective:
    """Next-token prediction on (inputs, targets) batches (B, T) from ``lmstack.data``, or dict batches
    (input_ids, labels = next-token targets, attention_mask, position_ids): SFT's, packed or padded.

    Args:
        token_bytes: (V,) UTF-8 bytes per token id, so held-out evaluation also reports bits per byte
            (comparable across tokenizers); None to skip it.

    While training a model with ``hidden_states`` and a plain ``nn.Linear`` LM head without bias, the head
    and the loss are fused (``linear_cross_entropy``) over the scored positions only; anything else (a
    compiled or adapted model, no gradients) takes the logits path. Both give the same loss and gradients
    up to float rounding.

    A mixture-of-experts model (``config.moe``) adds its router losses (``moe_auxiliary_loss``) and logs
    the router statistics; held-out evaluation reports the language-model loss alone.
    """

    def __init__(self, token_bytes: torch.Tensor | None = None) -> None:
        self.token_bytes = token_bytes

    def evaluate(self, model: nn.Module, batches: Iterable) -> dict[str, float]:
        """Held-out loss, perplexity and bits per byte (``evaluate_lm``)."""
        return evaluate_lm(model, batches, self.token_bytes)

    def loss_items(self, batch) -> int:
        """The scored tokens of ``batch``: its loss is their mean (the Trainer weighs micro-batches by them)."""
        return labelled_items(_unpack(batch)[1])

    def pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one pipeline micro-batch from the last stage's logits (B, T, V) (dense models)."""
        return causal_lm_loss(logits, targets)

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        inputs, targets, extra = _unpack(batch)
        moe = getattr(getattr(model, "config", None), "moe", None)
        kwargs = {**extra, "return_routing": True} if moe is not None else extra
        head = getattr(model, "lm_head", None)
        if (torch.is_grad_enabled() and hasattr(model, "hidden_states") and type(head) is nn.Linear
                and head.bias is None):
            out = model.hidden_states(inputs, **kwargs)
            hidden, routings = out if moe is not None else (out, None)
            hidden, flat = hidden.flatten(0, 1), targets.flatten()
            scored = flat != IGNORE_INDEX
            if not bool(scored.all()):  # only scored positions reach the head (SFT: the assistant tokens)
                hidden, flat = hidden[scored], flat[scored]
            loss = linear_cross_entropy(hidden, head.weight, flat)
        else:
            out = model(inputs, **kwargs)
            logits, routings = out if moe is not None else (out, None)
            loss = causal_lm_loss(logits, targets)
        metrics = {"tokens": labelled_items(targets)}
        if routings:
            mask = extra.get("attention_mask")
            aux, router_metrics = moe_auxiliary_loss(routings, moe.aux_loss_coef, moe.z_loss_coef,
                                                     None if mask is None else mask != 0)
            metrics.update(lm_loss=float(loss.detach()), **router_metrics)
            loss = loss + aux
        return loss, metrics


def moe_auxiliary_loss(routings: list[Routing], aux_loss_coef: float, z_loss_coef: float,
                       valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``aux_loss_coef * load_balancing_loss + z_loss_coef * router_z_loss`` over every MoE layer's tokens
    (``valid``: (B, T), False for padding), and the numbers to log: both losses and ``routing_stats``."""
    balance = load_balancing_loss(routings, valid)
    z = router_z_loss(routings, valid)
    metrics = {"moe_aux_loss": float(balance.detach()), "moe_z_loss": float(z.detach()), **routing_stats(routings)}
    return aux_loss_coef * balance + z_loss_coef * z, metrics
