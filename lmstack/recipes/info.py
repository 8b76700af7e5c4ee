"""`lmstack info PATH`: describe a checkpoint (HF directory or GGUF file) from its metadata, and report
tensors holding NaN or inf (reading each weight once; --no-check-weights skips that)."""

from pathlib import Path

from lmstack.checkpoints import inspect_hf, is_gguf, non_finite_tensors
from lmstack.compress import QuantizedEmbedding, QuantizedLinear, quantized_bytes
from lmstack.compress.files import is_quantized_checkpoint, load_quantized, module_records
from lmstack.models.registry import family_for_config
from lmstack.models import DecoderConfig, EncoderConfig, EncoderDecoderConfig
from lmstack.models.summary import format_parameter_table
from lmstack.nn.moe import active_parameters
from lmstack.recipes.bundled import resolve_model_dir
from lmstack.recipes.configs.info import InfoConfig


def describe(path: Path) -> str:
    """The report `lmstack info` prints. An HF directory is read from config.json and the safetensors
    headers only; a GGUF file from its metadata and tensor index (weights are not dequantised)."""
    path = resolve_model_dir(path)
    if is_gguf(path):
        return _describe_gguf(path)
    if is_quantized_checkpoint(path):
        return _describe_quantized(path)
    checkpoint = inspect_hf(path)
    model = checkpoint.model
    files = sorted({info.file.name for info in checkpoint.tensors.values()})
    lines = [f"checkpoint      {checkpoint.directory}",
             f"family          {checkpoint.family.model_type} ({checkpoint.family.architecture})",
             *_common_lines(model),
             f"dtype           {str(checkpoint.stored_dtype).removeprefix('torch.')}",
             f"files           {', '.join(files)}"]
    return "\n".join(lines + ["", format_parameter_table(model)])


def _describe_gguf(path: Path) -> str:
    from collections import Counter

    from lmstack.checkpoints.gguf import hf_config_from_gguf, read_gguf
    from lmstack.models.registry import FAMILIES

    file = read_gguf(path)
    hf_config = hf_config_from_gguf(file)
    family = FAMILIES[hf_config["model_type"]]
    model = family.build_empty(family.config_from_hf(hf_config))
    types = Counter(t.kind for t in file.tensors.values())
    name = file.metadata.get("general.name", "")
    size = path.stat().st_size / 2**20
    lines = [f"checkpoint      {path} (GGUF, {size:,.0f} MiB{', ' + name if name else ''})",
             f"family          {family.model_type} (GGUF architecture {file.architecture})",
             *_common_lines(model),
             f"tensor types    {', '.join(f'{kind} x{n}' for kind, n in types.most_common())}",
             f"tokenizer       {file.metadata.get('tokenizer.ggml.model', 'none')} "
             f"(pre-tokenizer {file.metadata.get('tokenizer.ggml.pre', 'default')}, "
             f"{len(file.metadata.get('tokenizer.ggml.tokens') or []):,} tokens); chat template "
             f"{'yes' if file.metadata.get('tokenizer.chat_template') else 'none'}"]
    return "\n".join(lines + ["", format_parameter_table(model)])


def _describe_quantized(path: Path) -> str:
    """An lmstack-quantized directory: its layers' schemes and the bytes they take."""
    from collections import Counter

    model = load_quantized(path)
    layers = Counter(f"{m.scheme}" + (f" group {m.group_size}" if m.group_size else "")
                     + (f" ({m.activations} activations)" if m.activations else "")
                     for m in model.modules() if isinstance(m, QuantizedLinear))
    records = module_records(model)
    held = sum(m.in_features * m.out_features for name, m in model.named_modules()  # a shared table: once
               if isinstance(m, QuantizedLinear) and "shares" not in records[name])
    held += sum(m.num_embeddings * m.embedding_dim for m in model.modules() if isinstance(m, QuantizedEmbedding))
    embedding = "fp32"
    if "embed_tokens" in records:
        table = records["embed_tokens"]
        embedding = table["scheme"] + (f" group {table['group_size']}" if table["group_size"] else "")
        if records.get("lm_head", {}).get("shares") == "embed_tokens":
            embedding += ", shared with the LM head"
    lines = [f"checkpoint      {path} (lmstack-quantized, {model.quantization['scheme']})",
             f"family          {family_for_config(model.config).model_type}",
             *_common_lines(model, extra=held),
             f"quantized       {', '.join(f'{n} x {kind}' for kind, n in layers.most_common())}; "
             f"{quantized_bytes(model) / 2**20:,.1f} MiB of tensors",
             f"embedding       {embedding}"]
    return "\n".join(lines + ["", "(per-module table: see the unquantized checkpoint)"])


def _describe_experts(model) -> str:
    m, cfg = model.config.moe, model.config
    layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    shared = f", a shared expert of width {m.shared_expert_dim}" if m.shared_expert_dim else ""
    active = active_parameters(model)
    return (f"experts         {m.num_experts} per MoE layer ({layers} of {cfg.n_layers} layers), top-{m.top_k}, "
            f"width {m.expert_dim}{shared}; {active:,} ({active / 1e6:.1f}M) parameters active per token")


def _common_lines(model, extra: int = 0) -> list[str]:
    """Size and shape lines for any model kind (``extra``: weights held outside Parameters, e.g. quantized)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters()) + extra
    lines = [f"parameters      {params:,} ({params / 1e6:.1f}M)"]
    if isinstance(cfg, DecoderConfig):
        attention = f"{cfg.n_heads} heads, {cfg.n_kv_heads} key/value heads, head_dim {cfg.head_dim}"
        if cfg.sliding_window is not None:
            attention += f", sliding window {cfg.sliding_window}"
        lines += ["kind            decoder (causal language model)",
                  f"context length  {cfg.max_seq_len:,} tokens",
                  f"shape           {cfg.n_layers} layers, width {cfg.dim}, feed-forward {cfg.ffn_dim} ({cfg.mlp}, "
                  f"{cfg.activation}), vocabulary {cfg.vocab_size:,}",
                  f"attention       {attention}", f"positions       {_describe_positions(cfg)}",
                  f"norm            {cfg.norm} (eps {cfg.norm_eps:g}); embeddings "
                  f"{'tied' if cfg.tie_embeddings else 'untied'}"]
        if cfg.moe is not None:
            lines.append(_describe_experts(model))
    elif isinstance(cfg, EncoderConfig):
        head = cfg.head + (f" ({len(cfg.labels)} labels: {', '.join(cfg.labels[:6])}"
                           f"{', ...' if len(cfg.labels) > 6 else ''})" if cfg.labels else "")
        lines += [f"kind            encoder (BERT), head {head}",
                  f"context length  {cfg.max_seq_len:,} tokens",
                  f"shape           {cfg.n_layers} layers, width {cfg.dim}, feed-forward {cfg.ffn_dim} "
                  f"({cfg.activation}), vocabulary {cfg.vocab_size:,}, {cfg.type_vocab_size} token types",
                  f"attention       {cfg.n_heads} heads", "positions       learned",
                  f"norm            layernorm, post-norm (eps {cfg.norm_eps:g})"]
    elif isinstance(cfg, EncoderDecoderConfig):
        lines += ["kind            encoder-decoder (T5)",
                  f"shape           {cfg.n_layers} encoder + {cfg.n_decoder_layers} decoder layers, width {cfg.dim}, "
                  f"feed-forward {cfg.ffn_dim} ({cfg.mlp}, {cfg.activation}), vocabulary {cfg.vocab_size:,}",
                  f"attention       {cfg.n_heads} heads, head_dim {cfg.head_dim}",
                  f"positions       relative buckets ({cfg.relative_buckets}, max distance {cfg.relative_max_distance})",
                  f"norm            rmsnorm (eps {cfg.norm_eps:g}); embeddings "
                  f"{'tied' if cfg.tie_embeddings else 'untied'}"]
    return lines


def _describe_positions(cfg) -> str:
    """e.g. "rope (theta 500000, llama3 scaling x32)" or "learned"."""
    if cfg.position != "rope":
        return cfg.position
    scaling = f", {cfg.rope_scaling.kind} scaling x{cfg.rope_scaling.factor:g}" if cfg.rope_scaling else ""
    return f"rope (theta {cfg.rope_theta:g}{scaling})"


def weights_report(path: Path) -> str:
    """The line on non-finite weights, e.g. "weights         2 tensors hold NaN or inf: a.weight, b.bias"."""
    bad = non_finite_tensors(resolve_model_dir(path))
    if not bad:
        return "weights         all finite"
    listed = ", ".join(bad[:8]) + (f", ... ({len(bad) - 8} more)" if len(bad) > 8 else "")
    return f"weights         {len(bad)} tensor(s) hold NaN or inf: {listed}"


def run(cfg: InfoConfig) -> None:
    report = describe(cfg.path)
    if cfg.check_weights:
        head, _, table = report.partition("\n\n")
        report = f"{head}\n{weights_report(cfg.path)}\n\n{table}"
    print(report)
