"""Mixture of experts: a router sends each token to k of E feed-forward experts.

    x (N, C) -> router logits (N, E) -> scores (softmax | sigmoid) -> top-k experts and weights (N, k)
      [training, with a capacity factor: assignments past an expert's capacity are dropped]
      -> assignments sorted by expert -> each expert runs once, on its contiguous slice of tokens
      -> outputs scaled by their weights and summed back per token      (+ a shared expert, Qwen-MoE)
      -> y (N, C)

Papers: sparsely-gated MoE (Shazeer et al. 2017, noisy top-k gating), GShard (Lepikhin et al. 2020,
capacity and its priority order), Switch Transformers (Fedus et al. 2021, top-1, the load-balancing loss),
ST-MoE (Zoph et al. 2022, the router z-loss). The load-balancing loss is Mixtral's in transformers
(``load_balancing_loss_func``: E * sum_e f_e * P_e over every layer's tokens, f counting all k slots, so a
perfectly balanced router scores k, not 1).

The experts are ordinary feed-forward modules (``experts.{e}.gate_proj`` ...), so quantization, LoRA and
the CPU decoding kernels treat them as they treat any linear; a decode step runs only the k chosen
experts, so it reads only their weights.
"""

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.nn.mlp import make_mlp

ScoreKind = Literal["softmax", "sigmoid"]


@dataclass
class Routing:
    """Where one MoE layer sent its N tokens.

    Attributes:
        logits: (N, E) router logits (before any noise), fp32 (fp64 for fp64 inputs).
        scores: (N, E) router scores (softmax or sigmoid of the noisy logits), dtype of ``logits``.
        experts: (N, k) chosen experts, best first (int64).
        weights: (N, k) the weights their outputs are summed with.
        kept: (N, k) bool, False where the capacity limit dropped the assignment; None when nothing is limited.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    def probabilities(self) -> torch.Tensor:
        """(N, E) scores normalised per token (softmax scores already are; sigmoid scores are divided by
        their sum)."""
        return self.scores / self.scores.sum(-1, keepdim=True)

    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) assignments each expert received (after capacity)."""
        chosen = self.experts if self.kept is None else self.experts[self.kept]
        return torch.bincount(chosen.flatten(), minlength=self.num_experts)

    def dropped(self) -> int:
        """Assignments the capacity limit dropped."""
        return 0 if self.kept is None else int((~self.kept).sum())


class TopKRouter(nn.Module):
    """Scores every expert for every token and keeps the k best.

    Args:
        dim: token width C.
        num_experts: E.
        top_k: experts per token.
        score: "softmax" over the experts (Mixtral, Qwen-MoE, Switch) or an independent "sigmoid" per expert.
        normalize_top_k: divide the k kept scores by their sum (Mixtral; with softmax this is the softmax of
            the k kept logits, Shazeer's gate); else keep them as scored (Qwen2-MoE, Switch).
        noisy: Shazeer's noisy top-k gating while training: logits + N(0, 1) * softplus(x @ noise_weight.T).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score: ScoreKind = "softmax",
                 normalize_top_k: bool = True, noisy: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score={score!r} is not one of ['softmax', 'sigmoid']")
        self.top_k, self.score, self.normalize_top_k = top_k, score, normalize_top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.noise_weight = nn.Parameter(torch.empty(num_experts, dim)) if noisy else None

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (N, C) -> the Routing of the N tokens (no capacity limit)."""
        logits = _at_least_fp32(F.linear(x, self.weight))
        noisy = logits
        if self.noise_weight is not None and self.training:
            spread = F.softplus(_at_least_fp32(F.linear(x, self.noise_weight)))
            noisy = logits + torch.randn_like(logits) * spread
        scores = router_scores(noisy, self.score)
        weights, experts = torch.topk(scores, self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits, scores, experts, weights.to(x.dtype))


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Routing runs in fp32 under bf16 / fp16 weights (as transformers' softmax(dtype=float)); fp64 stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def router_scores(logits: torch.Tensor, score: ScoreKind) -> torch.Tensor:
    """(N, E) logits -> (N, E) scores in at least fp32."""
    logits = _at_least_fp32(logits)
    return torch.softmax(logits, dim=-1) if score == "softmax" else torch.sigmoid(logits)


def expert_capacity(n_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(factor * tokens * k / experts) (Switch's, with GShard's k)."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / num_experts))


def limit_capacity(routing: Routing, capacity: int) -> Routing:
    """``routing`` with every expert's assignments past the first ``capacity`` marked dropped.

    Priority follows GShard: every token's first choice before any token's second choice, and within a
    choice, tokens in order (for top-1 this is Switch's token order)."""
    by_choice = routing.experts.t().flatten()  # (k * N,): choice-major
    one_hot = F.one_hot(by_choice, routing.num_experts)
    position = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)  # place in its expert's queue
    kept = (position < capacity).view(routing.experts.shape[1], -1).t()
    return replace(routing, kept=kept)


def dispatch(x: torch.Tensor, experts: nn.ModuleList, routing: Routing) -> torch.Tensor:
    """Run each token through its chosen experts and sum their outputs with the routing weights.

    Assignments are sorted by expert, so each expert runs once on one contiguous slice (no loop over tokens);
    an expert nobody chose is not called (and its weights are not read).
    x: (N, C) -> (N, C); dropped assignments contribute nothing.
    """
    k = routing.experts.shape[1]
    flat = routing.experts.flatten()  # assignment a = token * k + slot
    if routing.kept is None:
        order = torch.argsort(flat, stable=True)
    else:
        slots = routing.kept.flatten().nonzero().squeeze(1)
        order = slots[torch.argsort(flat[slots], stable=True)]
    counts = torch.bincount(flat[order], minlength=len(experts)).tolist()
    tokens = order // k
    inputs = x.index_select(0, tokens)  # not x[tokens]: its backward (index_put) is ~8x slower on CPU
    # split, not slices: a slice's backward fills a zero tensor of the whole input per expert
    outputs = [expert(chunk) for expert, chunk, count in zip(experts, inputs.split(counts), counts) if count]
    out = torch.zeros_like(x)
    if outputs:
        weighted = torch.cat(outputs) * routing.weights.flatten().index_select(0, order)[:, None]
        out.index_add_(0, tokens, weighted.to(x.dtype))
    return out


class MoE(nn.Module):
    """A mixture-of-experts feed-forward block: ``x (..., C) -> (..., C)``, in place of an MLP.

    Args:
        dim: token width C.
        expert_dim: hidden width of each expert.
        num_experts, top_k, score, normalize_top_k, noisy: the router (``TopKRouter``).
        mlp, activation, bias: the experts' kind ("gated": SwiGLU / GeGLU; "plain": GELU / ReLU MLPs).
        capacity_factor: while training, at most ``expert_capacity(...)`` assignments per expert per call,
            the rest dropped (their tokens keep the residual only); None: no limit. Inference never drops.
        shared_expert_dim: width of an always-on expert added to every token (Qwen-MoE); None: none.
        shared_expert_gate: scale the shared expert's output by sigmoid(shared_expert_gate(x)).
        jitter: while training, multiply the input (of router and experts alike) by U(1 - jitter, 1 + jitter).
    """

    def __init__(self, dim: int, expert_dim: int, num_experts: int, top_k: int, *, mlp: str = "gated",
                 activation: str = "silu", bias: bool = False, score: ScoreKind = "softmax",
                 normalize_top_k: bool = True, noisy: bool = False, capacity_factor: float | None = None,
                 shared_expert_dim: int | None = None, shared_expert_gate: bool = True, jitter: float = 0.0) -> None:
        super().__init__()
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0 (or None for no limit)")
        self.num_experts, self.top_k, self.capacity_factor, self.jitter = num_experts, top_k, capacity_factor, jitter
        self.gate = TopKRouter(dim, num_experts, top_k, score, normalize_top_k, noisy)
        self.experts = nn.ModuleList(make_mlp(mlp, dim, expert_dim, activation, bias) for _ in range(num_experts))
        self.shared_expert = make_mlp(mlp, dim, shared_expert_dim, activation, bias) if shared_expert_dim else None
        self.shared_expert_gate = (nn.Linear(dim, 1, bias=False)
                                   if shared_expert_dim and shared_expert_gate else None)

    def route(self, x: torch.Tensor) -> Routing:
        """x: (N, C) -> its Routing, capacity-limited while training."""
        routing = self.gate(x)
        if self.capacity_factor is not None and self.training:
            capacity = expert_capacity(x.shape[0], self.num_experts, self.top_k, self.capacity_factor)
            routing = limit_capacity(routing, capacity)
        return routing

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        """x: (..., C) -> y (..., C), or (y, Routing) with ``return_routing``."""
        flat = x.reshape(-1, x.shape[-1])
        if self.jitter > 0 and self.training:
            flat = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        routing = self.route(flat)
        y = dispatch(flat, self.experts, routing)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            y = y + shared
        y = y.view(x.shape)
        return (y, routing) if return_routing else y


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: all of ``model``'s but the experts it is not sent to (each MoE layer's
    ``num_experts - top_k`` experts); all of them for a dense model."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, MoE):
            per_expert = sum(p.numel() for p in module.experts[0].parameters())
            total -= (module.num_experts - module.top_k) * per_expert
    return total


# --- training signals -------------------------------------------------------------------------------------

def _flat_valid(valid: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """(n,) float weights of the routed tokens: 1 for those that count (all of them without ``valid``)."""
    if valid is None:
        return torch.ones(n, device=device)
    valid = valid.reshape(-1).float()
    if valid.numel() != n:
        raise ValueError(f"valid has {valid.numel()} entries for {n} routed tokens")
    return valid


def load_balancing_loss(routings: Sequence[Routing], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch / Mixtral load-balancing loss over all layers' tokens: E * sum_e f_e * P_e.

    f_e: assignments to expert e (all k slots, before capacity) per token; P_e: mean router probability of e
    (softmax of the logits; sigmoid scores normalised per token). ``valid`` (B, T) or (N,): 1 for tokens that
    count (padding excluded), as transformers' ``attention_mask`` argument. Equal to transformers'
    ``load_balancing_loss_func`` (Mixtral, Qwen-MoE) and, for one group, Switch's.
    """
    if not routings:
        raise ValueError("load_balancing_loss needs at least one routing")
    E = routings[0].num_experts
    counts = torch.zeros(E, device=routings[0].logits.device)
    probs = torch.zeros(E, device=routings[0].logits.device)
    rows = torch.zeros((), device=routings[0].logits.device)
    for r in routings:
        p = r.probabilities()
        mask = _flat_valid(valid, p.shape[0], p.device)
        counts = counts + torch.zeros(E, device=p.device).scatter_add_(
            0, r.experts.flatten(), mask.repeat_interleave(r.experts.shape[1]))
        probs, rows = probs + (p * mask[:, None]).sum(0), rows + mask.sum()
    return E * torch.sum(counts / rows * probs / rows)


def router_z_loss(routings: Sequence[Routing], valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens (and layers) of logsumexp(logits)^2 (Switch's
    ``router_z_loss_func``); keeps the router logits small."""
    total, rows = 0.0, 0.0
    for r in routings:
        z = torch.logsumexp(r.logits, dim=-1) ** 2
        mask = _flat_valid(valid, z.shape[0], z.device)
        total, rows = total + (z * mask).sum(), rows + mask.sum()
    return total / rows


@torch.no_grad()
def routing_stats(routings: Sequence[Routing]) -> dict[str, float]:
    """Numbers to log per step: router entropy (nats, mean over tokens and layers), the load of the busiest
    expert relative to a perfectly even split (1.0 = balanced), the dropped share of assignments, and
    each expert's share of all assignments (``moe_load_{e}``, summing to 1)."""
    counts = sum(r.tokens_per_expert().float() for r in routings)
    assigned = sum(r.experts.numel() for r in routings)
    entropy = 0.0
    for r in routings:
        p = r.probabilities()
        entropy += float(-(p * p.clamp_min(1e-12).log()).sum())
    share = counts / max(float(counts.sum()), 1.0)
    stats = {"moe_router_entropy": entropy / sum(r.logits.shape[0] for r in routings),
             "moe_load_max": float(share.max()) * len(share),
             "moe_dropped": sum(r.dropped() for r in routings) / max(assigned, 1)}
    stats.update({f"moe_load_{e}": float(s) for e, s in enumerate(share)})
    return stats
