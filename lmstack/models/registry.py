"""Family registry: one record per Hugging Face ``model_type``, so loading, PEFT and parallelism never
branch on family names.

A Family holds (a) how an HF ``config.json`` maps to our config and back, and (b) the tensor-name map as
data: a list of TensorRule (HF name pattern -> our names, with named fix-up functions where HF stores a
tensor differently, e.g. GPT-2's fused, transposed Conv1D ``c_attn``). Patterns name their indices:
``{layer}`` (a block), ``{expert}`` (an expert of a mixture-of-experts layer).
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from lmstack.errors import ConfigError
from lmstack.models.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig
from lmstack.models.decoder import Decoder
from lmstack.models import hf_configs, hf_encoder_configs
from lmstack.models.encoder import Encoder
from lmstack.models.encoder_decoder import EncoderDecoder


# --- tensor fix-ups (named, so the map stays data) -----------------------------------------------------

def transpose(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """HF Conv1D stores (in, out); nn.Linear stores (out, in)."""
    return (t.t().contiguous(),)


def untranspose(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ts[0].t().contiguous()


def split_qkv_conv1d(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GPT-2 c_attn weight (C, 3C) -> q, k, v weights, each (C, C) in nn.Linear layout."""
    return tuple(w.contiguous() for w in t.t().chunk(3, dim=0))


def fuse_qkv_conv1d(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(ts, dim=0).t().contiguous()


def split_qkv_bias(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GPT-2 c_attn bias (3C,) -> q, k, v biases, each (C,)."""
    return tuple(b.contiguous() for b in t.chunk(3))


def fuse_qkv_bias(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(ts)


def _identity_in(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t,)


def _identity_out(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ts[0]


_INIT_FUNCTIONS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "kaiming_normal_",
                   "trunc_normal_", "xavier_uniform_", "xavier_normal_")


@contextmanager
def skip_init() -> Iterator[None]:
    """Within: ``torch.nn.init`` functions leave tensors as they are (for models about to be loaded)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


# Megatron's split of a decoder over tensor-parallel ranks, as (module-name pattern, style): each rank holds a
# slice of the vocabulary (embedding rows, LM-head rows: the loss is a vocabulary-parallel cross-entropy),
# of the attention heads (q/k/v split by output columns, o_proj by input rows) and of the MLP width.
DECODER_TP_PLAN: tuple[tuple[str, str], ...] = (
    ("embed_tokens", "vocab_embedding"),
    ("layers.*.attn", "split_heads"),
    ("layers.*.attn.q_proj", "colwise"), ("layers.*.attn.k_proj", "colwise"), ("layers.*.attn.v_proj", "colwise"),
    ("layers.*.attn.o_proj", "rowwise"),
    ("layers.*.mlp.gate_proj", "colwise"), ("layers.*.mlp.up_proj", "colwise"), ("layers.*.mlp.down_proj", "rowwise"),
    ("layers.*.mlp.fc_in", "colwise"), ("layers.*.mlp.fc_out", "rowwise"),
    ("lm_head", "vocab_head"),
)


@dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one or more of our tensors.

    Attributes:
        hf: HF name pattern, e.g. "model.layers.{layer}.self_attn.q_proj.weight".
        ours: our name patterns; several when HF fuses them into one tensor.
        to_ours: HF tensor -> our tensors (same order as ``ours``).
        to_hf: our tensors -> HF tensor.
    """

    hf: str
    ours: tuple[str, ...]
    to_ours: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _identity_in
    to_hf: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] = _identity_out
    save_only: bool = False  # a second stored copy for transformers' sake: written, never required or read

    @property
    def is_rename(self) -> bool:
        """The tensor is stored as it is, under another name (no split, fuse or transpose)."""
        return self.to_ours is _identity_in and self.to_hf is _identity_out


def rename(hf: str, ours: str) -> TensorRule:
    return TensorRule(hf, (ours,))


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model type maps onto an lmstack model class.

    Attributes:
        model_type: HF ``model_type`` ("gpt2", "llama", ...).
        architecture: HF class written to ``architectures`` ("LlamaForCausalLM").
        config_from_hf: HF config dict -> our config (raises ConfigError on bad values).
        config_to_hf: our config -> HF config dict.
        rules: tensor-name map.
        base_prefix: prefix of the base-model tensors; checkpoints saved from the bare base model
            (e.g. the original "gpt2" upload) omit it, and loading adds it back.
        ignored_hf: regexes of HF tensors with no counterpart here (buffers some versions saved).
    """

    model_type: str
    architecture: str
    config_from_hf: Callable[[dict[str, Any]], Any]  # -> DecoderConfig, EncoderConfig, ...
    config_to_hf: Callable[[Any], dict[str, Any]]
    rules: tuple[TensorRule, ...]
    base_prefix: str = ""
    ignored_hf: tuple[str, ...] = ()
    extra_architectures: tuple[str, ...] = ()  # other HF class names that mean this family
    stored_fallbacks: tuple[tuple[str, str], ...] = ()  # (HF name, the name older files store it under)

    # PEFT defaults (our module names; peft's defaults for the family): LoRA targets, IA3 targets and the
    # IA3 targets whose inputs (not outputs) are scaled.
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    ia3_targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward: tuple[str, ...] = ("down_proj",)
    # Tensor parallelism (lmstack.parallel.tensor): (module-name pattern, style) pairs; () means the family has
    # no plan (its experts or encoder blocks are not split) and tensor parallelism refuses it, naming it.
    tp_plan: tuple[tuple[str, str], ...] = DECODER_TP_PLAN

    model_class: Callable[[Any], torch.nn.Module] = Decoder  # built from the mapped config
    config_class: type = DecoderConfig

    def build(self, config: Any) -> torch.nn.Module:
        """The model this family's checkpoints load into (built on whatever device is current)."""
        return self.model_class(config)

    def build_empty(self, config: Any) -> torch.nn.Module:
        """The model on the meta device, its initialisation skipped: a checkpoint replaces every value,
        and random ops on meta tensors would import torch._dynamo (about 2 s of start-up)."""
        with torch.device("meta"), skip_init():
            return self.model_class(config)

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(pattern, hf_name) for pattern in self.ignored_hf)

    def hf_plan(self, our_names: list[str]) -> dict[str, tuple[TensorRule, tuple[str, ...]]]:
        """Map each HF tensor name to (rule, our names) for a model whose state dict holds ``our_names``.

        Rules whose tensors the model lacks (e.g. biases of a bias-free config, experts of a dense layer)
        are skipped; a tensor of ours that no rule covers is a bug in the registry and raises. A rule's
        placeholders (``{layer}``, ``{expert}``) take every value under which our names occur, so stacks of
        different depths (T5) and layers with and without experts need no counts of their own.
        """
        present, plan, covered = set(our_names), {}, set()
        for rule in self.rules:
            for binding in _bindings(rule.ours[0], our_names):
                ours = tuple(o.format(**binding) for o in rule.ours)
                if all(o in present for o in ours):
                    plan[rule.hf.format(**binding)] = (rule, ours)
                    covered.update(ours)
        missing = present - covered
        if missing:
            raise ConfigError(f"family {self.model_type!r} has no tensor rule for {sorted(missing)[:5]}")
        return plan


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _bindings(pattern: str, names: list[str]) -> list[dict[str, str]]:
    """Every assignment of ``pattern``'s named placeholders under which it spells one of ``names``."""
    if not _PLACEHOLDER.search(pattern):
        return [{}]
    parts = _PLACEHOLDER.split(pattern)  # literal, name, literal, name, ..., literal
    regex = re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts)))
    found = {tuple(sorted(m.groupdict().items())) for m in map(regex.fullmatch, names) if m}
    return [dict(b) for b in sorted(found, key=lambda b: tuple(int(v) for _, v in b))]


def _gpt2_rules() -> tuple[TensorRule, ...]:
    h, L = "transformer.h.{layer}.", "layers.{layer}."
    qkv = tuple(f"{L}attn.{p}_proj" for p in "qkv")
    return (
        rename("transformer.wte.weight", "embed_tokens.weight"),
        rename("transformer.wpe.weight", "embed_positions.weight"),
        rename(h + "ln_1.weight", L + "attn_norm.weight"),
        rename(h + "ln_1.bias", L + "attn_norm.bias"),
        TensorRule(h + "attn.c_attn.weight", tuple(q + ".weight" for q in qkv), split_qkv_conv1d, fuse_qkv_conv1d),
        TensorRule(h + "attn.c_attn.bias", tuple(q + ".bias" for q in qkv), split_qkv_bias, fuse_qkv_bias),
        TensorRule(h + "attn.c_proj.weight", (L + "attn.o_proj.weight",), transpose, untranspose),
        rename(h + "attn.c_proj.bias", L + "attn.o_proj.bias"),
        rename(h + "ln_2.weight", L + "mlp_norm.weight"),
        rename(h + "ln_2.bias", L + "mlp_norm.bias"),
        TensorRule(h + "mlp.c_fc.weight", (L + "mlp.fc_in.weight",), transpose, untranspose),
        rename(h + "mlp.c_fc.bias", L + "mlp.fc_in.bias"),
        TensorRule(h + "mlp.c_proj.weight", (L + "mlp.fc_out.weight",), transpose, untranspose),
        rename(h + "mlp.c_proj.bias", L + "mlp.fc_out.bias"),
        rename("transformer.ln_f.weight", "norm.weight"),
        rename("transformer.ln_f.bias", "norm.bias"),
        rename("lm_head.weight", "lm_head.weight"),
        rename("score.weight", "score.weight"),  # a score model's head (GPT2ForSequenceClassification)
    )


def _llama_rules() -> tuple[TensorRule, ...]:
    """Llama/Mistral/Qwen2/Qwen3 names: identical up to a few renames (our names mirror HF's)."""
    h, L = "model.layers.{layer}.", "layers.{layer}."
    rules = [rename("model.embed_tokens.weight", "embed_tokens.weight"),
             rename(h + "input_layernorm.weight", L + "attn_norm.weight"),
             rename(h + "post_attention_layernorm.weight", L + "mlp_norm.weight")]
    rules += [rename(f"{h}self_attn.{p}_norm.weight", f"{L}attn.{p}_norm.weight") for p in "qk"]  # Qwen3
    for kind in ("weight", "bias"):
        rules += [rename(f"{h}self_attn.{p}_proj.{kind}", f"{L}attn.{p}_proj.{kind}") for p in "qkvo"]
        rules += [rename(f"{h}mlp.{p}_proj.{kind}", f"{L}mlp.{p}_proj.{kind}") for p in ("gate", "up", "down")]
    rules += [rename("model.norm.weight", "norm.weight"), rename("lm_head.weight", "lm_head.weight"),
              rename("score.weight", "score.weight")]  # score models: ...ForSequenceClassification
    return tuple(rules)


def _moe_rules(block: str) -> tuple[TensorRule, ...]:
    """Router, experts and shared expert of a mixture-of-experts layer stored under ``block`` (Qwen-MoE:
    "mlp", our names; Mixtral: "block_sparse_moe", experts w1 / w3 / w2 = gate / up / down)."""
    h, L = f"model.layers.{{layer}}.{block}.", "layers.{layer}.mlp."
    names = ({"gate": "w1", "up": "w3", "down": "w2"} if block == "block_sparse_moe"
             else {p: f"{p}_proj" for p in ("gate", "up", "down")})
    rules = [rename(h + "gate.weight", L + "gate.weight")]
    for kind in ("weight", "bias"):
        rules += [rename(f"{h}experts.{{expert}}.{hf}.{kind}", f"{L}experts.{{expert}}.{p}_proj.{kind}")
                  for p, hf in names.items()]
        rules += [rename(f"{h}shared_expert.{p}_proj.{kind}", f"{L}shared_expert.{p}_proj.{kind}")
                  for p in ("gate", "up", "down")]
    return (*_llama_rules(), *rules, rename(h + "shared_expert_gate.weight", L + "shared_expert_gate.weight"))


def _bert_rules() -> tuple[TensorRule, ...]:
    h, L = "bert.encoder.layer.{layer}.", "layers.{layer}."
    pairs = [("bert.embeddings.word_embeddings", "embed_tokens"),
             ("bert.embeddings.position_embeddings", "embed_positions"),
             ("bert.embeddings.token_type_embeddings", "embed_token_types"),
             ("bert.embeddings.LayerNorm", "embed_norm"),
             (h + "attention.self.query", L + "attn.q_proj"), (h + "attention.self.key", L + "attn.k_proj"),
             (h + "attention.self.value", L + "attn.v_proj"), (h + "attention.output.dense", L + "attn.o_proj"),
             (h + "attention.output.LayerNorm", L + "attn_norm"), (h + "intermediate.dense", L + "mlp.fc_in"),
             (h + "output.dense", L + "mlp.fc_out"), (h + "output.LayerNorm", L + "mlp_norm"),
             ("bert.pooler.dense", "pooler.dense"),
             ("cls.predictions.transform.dense", "mlm_head.dense"),
             ("cls.predictions.transform.LayerNorm", "mlm_head.norm"),
             ("cls.seq_relationship", "nsp_head"), ("classifier", "classifier.proj")]
    rules = [rename(f"{hf}.{kind}", f"{ours}.{kind}") for hf, ours in pairs for kind in ("weight", "bias")]
    # transformers reads the vocabulary bias from cls.predictions.decoder.bias, and ties it to
    # cls.predictions.bias, which old checkpoints store alone (see Family.stored_fallbacks).
    rules += [rename("cls.predictions.decoder.weight", "mlm_head.decoder.weight"),
              rename("cls.predictions.decoder.bias", "mlm_head.decoder.bias"),
              TensorRule("cls.predictions.bias", ("mlm_head.decoder.bias",), save_only=True)]
    return tuple(rules)


_BERT_IGNORED = (r"bert\.embeddings\.position_ids",
                 # checkpoints of a task with a pooler, loaded for a head without one (as transformers does)
                 r"bert\.pooler\.dense\.(weight|bias)")


def _t5_rules() -> tuple[TensorRule, ...]:
    rules = [rename("shared.weight", "embed_tokens.weight"), rename("lm_head.weight", "lm_head.weight")]
    for stack, ff in (("encoder", 1), ("decoder", 2)):
        h, L = f"{stack}.block.{{layer}}.", f"{stack}.layers.{{layer}}."
        rules += [rename(f"{h}layer.0.SelfAttention.{p}.weight", f"{L}attn.{p}_proj.weight") for p in "qkvo"]
        rules += [rename(f"{h}layer.0.layer_norm.weight", f"{L}attn_norm.weight"),
                  rename(f"{h}layer.{ff}.layer_norm.weight", f"{L}mlp_norm.weight"),
                  rename(f"{h}layer.{ff}.DenseReluDense.wi.weight", f"{L}mlp.fc_in.weight"),
                  rename(f"{h}layer.{ff}.DenseReluDense.wo.weight", f"{L}mlp.fc_out.weight"),
                  rename(f"{h}layer.{ff}.DenseReluDense.wi_0.weight", f"{L}mlp.gate_proj.weight"),
                  rename(f"{h}layer.{ff}.DenseReluDense.wi_1.weight", f"{L}mlp.up_proj.weight"),
                  rename(f"{h}layer.{ff}.DenseReluDense.wo.weight", f"{L}mlp.down_proj.weight"),
                  rename(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                         f"{stack}.relative_bias.weight"),
                  rename(f"{stack}.final_layer_norm.weight", f"{stack}.norm.weight")]
    h, L = "decoder.block.{layer}.", "decoder.layers.{layer}."
    rules += [rename(f"{h}layer.1.EncDecAttention.{p}.weight", f"{L}cross_attn.{p}_proj.weight") for p in "qkvo"]
    rules += [rename(f"{h}layer.1.layer_norm.weight", f"{L}cross_attn_norm.weight")]
    return tuple(rules)


_T5_IGNORED = (r"(encoder|decoder)\.embed_tokens\.weight",  # copies of shared.weight
               r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")

_LLAMA_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "GPT2LMHeadModel", hf_configs.gpt2_from_hf, hf_configs.gpt2_to_hf, _gpt2_rules(),
                   base_prefix="transformer.", ignored_hf=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",),
                   ia3_targets=("k_proj", "v_proj", "fc_out"), ia3_feedforward=("fc_out",)),
    "llama": Family("llama", "LlamaForCausalLM", hf_configs.llama_from_hf, hf_configs.llama_to_hf,
                    _llama_rules(), base_prefix="model.", ignored_hf=_LLAMA_IGNORED),
    "mistral": Family("mistral", "MistralForCausalLM", hf_configs.mistral_from_hf, hf_configs.mistral_to_hf,
                      _llama_rules(), base_prefix="model.", ignored_hf=_LLAMA_IGNORED),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", hf_configs.qwen2_from_hf, hf_configs.qwen2_to_hf,
                    _llama_rules(), base_prefix="model.", ignored_hf=_LLAMA_IGNORED),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", hf_configs.qwen3_from_hf, hf_configs.qwen3_to_hf,
                    _llama_rules(), base_prefix="model.", ignored_hf=_LLAMA_IGNORED),
    "mixtral": Family("mixtral", "MixtralForCausalLM", hf_configs.mixtral_from_hf, hf_configs.mixtral_to_hf,
                      _moe_rules("block_sparse_moe"), base_prefix="model.", ignored_hf=_LLAMA_IGNORED, tp_plan=()),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", hf_configs.qwen2_moe_from_hf, hf_configs.qwen2_moe_to_hf,
                        _moe_rules("mlp"), base_prefix="model.", ignored_hf=_LLAMA_IGNORED, tp_plan=()),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", hf_configs.qwen3_moe_from_hf, hf_configs.qwen3_moe_to_hf,
                        _moe_rules("mlp"), base_prefix="model.", ignored_hf=_LLAMA_IGNORED, tp_plan=()),
    "bert": Family("bert", "BertModel", hf_encoder_configs.bert_from_hf, hf_encoder_configs.bert_to_hf,
                   _bert_rules(), base_prefix="bert.", ignored_hf=_BERT_IGNORED,
                   stored_fallbacks=(("cls.predictions.decoder.bias", "cls.predictions.bias"),),
                   extra_architectures=tuple(hf_encoder_configs.BERT_ARCHITECTURES), model_class=Encoder,
                   config_class=EncoderConfig, ia3_targets=("k_proj", "v_proj", "fc_out"), ia3_feedforward=("fc_out",),
                   tp_plan=()),
    "t5": Family("t5", "T5ForConditionalGeneration", hf_encoder_configs.t5_from_hf, hf_encoder_configs.t5_to_hf,
                 _t5_rules(), ignored_hf=_T5_IGNORED, model_class=EncoderDecoder,
                 config_class=EncoderDecoderConfig, ia3_targets=("k_proj", "v_proj", "fc_out", "down_proj"),
                 ia3_feedforward=("fc_out", "down_proj"), tp_plan=()),
}


def family_for_hf_config(hf_config: dict[str, Any]) -> Family:
    """Pick the family from ``model_type`` (or, failing that, ``architectures``)."""
    model_type = hf_config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for arch in hf_config.get("architectures") or []:
        for family in FAMILIES.values():
            if arch == family.architecture or arch in family.extra_architectures:
                return family
    shown = model_type if model_type is not None else hf_config.get("architectures")
    raise ConfigError(f"unsupported model_type {shown!r}; lmstack supports {sorted(FAMILIES)}")


def family_for_config(config: DecoderConfig) -> Family:
    """The family to save ``config`` as: its ``model_type`` if set, else the first family that can
    express every field of it exactly."""
    if config.model_type is not None:
        if config.model_type not in FAMILIES:
            raise ConfigError(f"unsupported model_type {config.model_type!r}; lmstack supports {sorted(FAMILIES)}")
        return FAMILIES[config.model_type]
    for family in FAMILIES.values():
        if isinstance(config, family.config_class) and hf_configs.expressible(family.config_from_hf, family.config_to_hf, config) is None:
            return family
    raise ConfigError("no Hugging Face family can express this config exactly; set model_type to see why")
