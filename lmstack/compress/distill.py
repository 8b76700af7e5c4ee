"""Knowledge distillation: a student learns from a teacher's distributions, hidden states and attention maps.

    from lmstack.compress.distill import DistillObjective
    objective = DistillObjective(teacher, student, loss="kd", temperature=2.0, alpha=0.5)
    Trainer(student, objective, blocks, train_config, run_dir).fit()

Losses (per scored token, averaged over the tokens whose target is not IGNORE_INDEX):

- ``kd_loss`` (Hinton et al., 2015): ``alpha · T² · KL(p_t ‖ p_s)`` on temperature-T softmaxes, plus
  ``(1 - alpha) ·`` the cross-entropy on the real next tokens. The T² keeps the soft-target gradients the same
  size whatever T (they shrink as 1/T² otherwise).
- ``generalized_jsd_loss`` (Agarwal et al., 2024, GKD): β·KL(p_t ‖ m) + (1-β)·KL(p_s ‖ m) with the mixture
  m = β·p_t + (1-β)·p_s; β = 0 is forward KL(p_t ‖ p_s), β = 1 reverse KL(p_s ‖ p_t). Equal to trl's
  ``GKDTrainer.generalized_jsd_loss`` (which, like GKD, applies no T² factor).
- feature matching (``FeatureMatcher``): the MSE between each chosen student block's output, mapped to the
  teacher's width by a learned linear projection, and the teacher block it is paired with; and the KL between
  their head-averaged attention maps (widths and head counts may differ; the maps are T × T either way).

Where the text comes from (``mode``): ``"text"`` the training data (off-policy); ``"on_policy"`` with
probability ``on_policy_fraction`` a batch's continuation is sampled from the student itself and scored by the
teacher (GKD's λ); ``"sequence"`` the teacher writes the continuation (sequence-level KD, Kim & Rush 2016)
and the student learns it. Teacher and student must share the tokenizer (``check_same_vocabulary``).
"""

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.generate import GenerationConfig, generate
from lmstack.nn.attention import Attention, repeat_kv
from lmstack.nn.positions import apply_rotary

IGNORE_INDEX = -100  # lmstack.data.collate.IGNORE_INDEX: targets left out of every mean
LOSSES = ("kd", "jsd")
MODES = ("text", "on_policy", "sequence")


# --- losses ---------------------------------------------------------------------------------------------

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 2.0, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinton's loss ``alpha·T²·KL(p_t‖p_s) + (1-alpha)·CE``; logits (B, T, V), targets (B, T).

    Returns (loss, the KL term, the cross-entropy term), each a mean over scored tokens."""
    scored = targets != IGNORE_INDEX
    s, t = student_logits[scored].float() / temperature, teacher_logits[scored].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits[scored].float(), targets[scored])
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None = None, beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean") -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence of logits (B, T, V) -> scalar (or per element with
    ``reduction="none"``); ``labels`` (B, T) IGNORE_INDEX marks positions left out. "batchmean" divides the sum
    by the scored tokens (with labels) or by B (without), as trl does."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        divergence = F.kl_div(s, t, reduction="none", log_target=True)  # KL(teacher ‖ student)
    elif beta == 1:
        divergence = F.kl_div(t, s, reduction="none", log_target=True)  # KL(student ‖ teacher)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        mixture = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        divergence = (b * F.kl_div(mixture, t, reduction="none", log_target=True)
                      + (1 - b) * F.kl_div(mixture, s, reduction="none", log_target=True))
    if labels is not None:
        divergence = divergence[labels != IGNORE_INDEX]
    if reduction == "none":
        return divergence
    if reduction == "sum":
        return divergence.sum()
    if reduction == "mean":
        return divergence.mean()
    # batchmean as trl: per scored token with labels, per sequence (the batch size) without them
    return divergence.sum() / max(divergence.shape[0], 1)


# --- hidden states and attention maps -----------------------------------------------------------------

def attention_map(attn: Attention, x: torch.Tensor, mask, rotary) -> torch.Tensor:
    """The head-averaged attention probabilities (B, T, T) that ``attn`` computes for its input x (B, T, C)."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim)
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    q, (k, _) = q.transpose(1, 2), attn.project_kv(x)
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    k = repeat_kv(k, attn.n_heads // attn.n_kv_heads)
    scale = attn.scale if attn.scale is not None else 1.0 / math.sqrt(attn.head_dim)
    scores = (q @ k.transpose(-2, -1)).float() * scale
    bias = mask.bias(*mask.slots(T, T, x.device), torch.float32)
    return torch.softmax(scores if bias is None else scores + bias, dim=-1).mean(dim=1)


class _Recorder:
    """Forward hooks on chosen blocks that keep their outputs and (optionally) their attention maps while
    ``on`` (one training forward); generation and held-out scoring pass through untouched."""

    def __init__(self, model: nn.Module, layers: list[int], attention: bool) -> None:
        self.hidden: dict[int, torch.Tensor] = {}
        self.maps: dict[int, torch.Tensor] = {}
        self.on = False
        for i in layers:
            block = model.layers[i]
            block.register_forward_hook(lambda _m, _a, out, i=i: self._keep(self.hidden, i, out))
            if attention:
                block.attn.register_forward_pre_hook(
                    lambda m, args, i=i: self._keep(self.maps, i, None, lambda: attention_map(m, *args[:3])))

    def _keep(self, into: dict, i: int, out, compute=None) -> None:
        if self.on:
            into[i] = compute() if compute is not None else (out[0] if isinstance(out, tuple) else out)

    def start(self) -> None:
        self.hidden.clear()
        self.maps.clear()
        self.on = True


def layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block i paired with teacher block round((i+1)·L_t/L_s) - 1: evenly spaced, last with last."""
    return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]


class FeatureProjections(nn.Module):
    """Learned linear maps from the student's width to the teacher's, one per matched block. Attached to the
    student while it trains (``student.distill_projections``) so the optimizer and checkpoints see it; a
    plain save of the student leaves it out (a training-only transform: ``merged_state`` is empty)."""

    transform_name = "distillation projections"

    def __init__(self, student_dim: int, teacher_dim: int, count: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(count))
        for m in self.maps:  # the identity where widths agree (a head start), else a scaled random map
            if student_dim == teacher_dim:
                nn.init.eye_(m.weight)

    def added_tensors(self) -> list[str]:
        return list(self.state_dict())

    def merged_state(self) -> dict[str, torch.Tensor]:
        return {}


# --- the objective --------------------------------------------------------------------------------------

def check_same_vocabulary(teacher: nn.Module, student: nn.Module, teacher_tokenizer=None,
                          student_tokenizer=None) -> None:
    """Raises ConfigError unless teacher and student score the same token ids (vocabulary size, and the
    tokenizers' vocabularies when given)."""
    t, s = teacher.config.vocab_size, student.config.vocab_size
    if t != s:
        raise ConfigError(f"teacher and student have different vocabularies ({t:,} vs {s:,} tokens); "
                          "distillation needs one tokenizer for both")
    if teacher_tokenizer is not None and student_tokenizer is not None:
        if teacher_tokenizer.vocab != student_tokenizer.vocab:
            differ = sorted(set(teacher_tokenizer.vocab.items()) ^ set(student_tokenizer.vocab.items()))[:3]
            raise ConfigError(f"teacher and student tokenizers differ (e.g. {differ}); distillation needs one "
                              "tokenizer for both")


class DistillObjective:
    """The Trainer objective of distillation over (inputs, targets) token blocks (module docstring).

    Args:
        teacher: the frozen teacher (kept in eval mode, no gradients).
        student: the model being trained (to attach the feature projections to).
        loss: "kd" (temperature-scaled KL with T², mixed with the hard labels by ``alpha``) or "jsd" (GKD's
            generalised JSD with ``beta``, plus ``(1 - alpha)`` of the hard labels when alpha < 1).
        hidden_weight / attention_weight: weights of the hidden-state MSE and attention-map KL (0: off).
        mode: "text", "on_policy" or "sequence"; ``prompt_tokens`` of each row kept as the prompt, the rest
            generated (sampled at ``sample_temperature``); ``on_policy_fraction`` of batches for on_policy.
        evaluate: ``evaluate(model, batches) -> dict`` for held-out numbers (the causal LM objective's).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, loss: str = "kd", temperature: float = 2.0,
                 alpha: float = 0.5, beta: float = 0.5, hidden_weight: float = 0.0, attention_weight: float = 0.0,
                 mode: str = "text", on_policy_fraction: float = 1.0, prompt_tokens: int = 16,
                 sample_temperature: float = 1.0, seed: int = 0, evaluate=None) -> None:
        if loss not in LOSSES:
            raise ConfigError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if mode not in MODES:
            raise ConfigError(f"unknown distillation mode {mode!r}; choose one of {', '.join(MODES)}")
        for name, value in (("alpha", alpha), ("beta", beta), ("on_policy_fraction", on_policy_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"distill.{name}={value} must be in [0, 1]")
        if not temperature > 0 or not sample_temperature > 0:
            raise ConfigError(f"distill temperatures must be > 0 (temperature={temperature}, "
                              f"sample_temperature={sample_temperature})")
        if hidden_weight < 0 or attention_weight < 0:
            raise ConfigError("distill.hidden_weight and distill.attention_weight must be >= 0")
        check_same_vocabulary(teacher, student)
        self.teacher = teacher.eval().requires_grad_(False)
        self.loss, self.temperature, self.alpha, self.beta = loss, temperature, alpha, beta
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight
        self.mode, self.fraction, self.prompt_tokens = mode, on_policy_fraction, prompt_tokens
        self.sample_temperature, self.rng, self.seed = sample_temperature, random.Random(seed), seed
        self.evaluate_fn = evaluate
        self.pairs = layer_pairs(student.config.n_layers, teacher.config.n_layers)
        self.features = hidden_weight > 0 or attention_weight > 0
        if self.features:
            if hidden_weight > 0 and not hasattr(student, "distill_projections"):
                student.distill_projections = FeatureProjections(student.config.dim, teacher.config.dim,
                                                                 len(self.pairs))
            self.student_rec = _Recorder(student, [s for s, _ in self.pairs], attention_weight > 0)
            self.teacher_rec = _Recorder(teacher, [t for _, t in self.pairs], attention_weight > 0)
        self.calls = 0

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """The student's own held-out numbers (the ``evaluate`` given), or none."""
        return {} if self.evaluate_fn is None else self.evaluate_fn(model, batches)

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        inputs, targets = batch
        self.calls += 1
        source = "text"
        if self.mode == "sequence" or (self.mode == "on_policy" and self.rng.random() < self.fraction):
            source = "teacher" if self.mode == "sequence" else "student"
            inputs, targets = self._generated(self.teacher if source == "teacher" else model, inputs)
        recorders = (self.student_rec, self.teacher_rec) if self.features else ()
        for rec in recorders:
            rec.start()
        try:
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
            student_logits = model(inputs)
        finally:
            for rec in recorders:
                rec.on = False
        if self.loss == "kd":
            loss, divergence, ce = kd_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha)
        else:
            divergence = generalized_jsd_loss(student_logits, teacher_logits, targets, self.beta, self.temperature)
            scored = targets != IGNORE_INDEX
            ce = F.cross_entropy(student_logits[scored].float(), targets[scored])
            loss = self.alpha * divergence + (1 - self.alpha) * ce
        metrics = {"tokens": int((targets != IGNORE_INDEX).sum()), "distill_divergence": float(divergence.detach()),
                   "distill_ce": float(ce.detach()), "distill_generated": float(source != "text")}
        if self.features:
            extra, feature_metrics = self._feature_loss(model)
            loss = loss + extra
            metrics.update(feature_metrics)
        return loss, metrics

    def _feature_loss(self, model: nn.Module) -> tuple[torch.Tensor, dict]:
        total, metrics = 0.0, {}
        if self.hidden_weight > 0:
            maps = model.distill_projections.maps
            mse = sum(F.mse_loss(maps[k](self.student_rec.hidden[s]).float(), self.teacher_rec.hidden[t].float())
                      for k, (s, t) in enumerate(self.pairs)) / len(self.pairs)
            total = total + self.hidden_weight * mse
            metrics["distill_hidden_mse"] = float(mse.detach())
        if self.attention_weight > 0:
            kl = sum(_map_kl(self.student_rec.maps[s], self.teacher_rec.maps[t]) for s, t in self.pairs) / len(self.pairs)
            total = total + self.attention_weight * kl
            metrics["distill_attention_kl"] = float(kl.detach())
        return total, metrics

    @torch.no_grad()
    def _generated(self, writer: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``prompt_tokens`` prompt + a continuation ``writer`` samples to the same length; targets
        score only the generated tokens."""
        prompt_len = min(self.prompt_tokens, inputs.shape[1] - 1)
        was_training = writer.training
        writer.eval()
        config = GenerationConfig(max_new_tokens=inputs.shape[1] - prompt_len, do_sample=True,
                                  temperature=self.sample_temperature, top_k=None, eos_token_id=[],
                                  seed=self.seed * 1_000_003 + self.calls)
        try:
            rows = generate(writer, inputs[:, :prompt_len], config)
        finally:
            writer.train(was_training)
        targets = torch.full_like(rows, IGNORE_INDEX)
        targets[:, prompt_len - 1:-1] = rows[:, prompt_len:]
        return rows, targets


def _map_kl(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of each query's attention row (B, T, T), averaged over the queries."""
    t, s = teacher_map.float().clamp_min(1e-12), student_map.float().clamp_min(1e-12)
    return (teacher_map.float() * (t.log() - s.log())).sum(-1).mean()
