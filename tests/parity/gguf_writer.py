"""Write GGUF files from random-init transformers models, as llama.cpp's converter lays them out (test helper).

The reference for GGUF parity is transformers' own GGUF loading of the same file, so these files only need
to be what llama.cpp would write: its tensor names, q/k rows permuted for the llama architecture, GPT-2's
fused qkv in nn.Linear layout, and the metadata keys transformers reads.
"""

import numpy as np
import torch

gguf = __import__("pytest").importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
# byte offsets of float16 scale fields per block (kept small and finite in random K-quant data)
SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
GGUF_CAN_QUANTIZE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant (or other) block bytes whose float16 scales are finite and moderate."""
    per, nbytes = BLOCKS[kind]
    raw = rng.integers(0, 256, (rows * cols // per, nbytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS.get(kind, (0,)):
        scales = rng.uniform(-0.02, 0.02, raw.shape[0]).astype(np.float16)
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, cols // per * nbytes)


def gguf_tensors(hf_model, arch: str) -> dict[str, np.ndarray]:
    """HF state dict -> GGUF-named float32 arrays."""
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    cfg = hf_model.config
    out = {}
    if arch == "gpt2":
        out["token_embd.weight"], out["position_embd.weight"] = sd["transformer.wte.weight"], sd["transformer.wpe.weight"]
        for i in range(cfg.n_layer):
            h, b = f"transformer.h.{i}.", f"blk.{i}."
            for hf, g, transpose in (("ln_1", "attn_norm", False), ("attn.c_attn", "attn_qkv", True),
                                     ("attn.c_proj", "attn_output", True), ("ln_2", "ffn_norm", False),
                                     ("mlp.c_fc", "ffn_up", True), ("mlp.c_proj", "ffn_down", True)):
                out[b + g + ".weight"] = sd[h + hf + ".weight"].T.copy() if transpose else sd[h + hf + ".weight"]
                out[b + g + ".bias"] = sd[h + hf + ".bias"]
        out["output_norm.weight"], out["output_norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
        return out
    out["token_embd.weight"], out["output_norm.weight"] = sd["model.embed_tokens.weight"], sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        h, b = f"model.layers.{i}.", f"blk.{i}."
        names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 **{f"self_attn.{p}_proj.{k}": f"attn_{g}.{k}" for p, g in (("q", "q"), ("k", "k"), ("v", "v"),
                                                                           ("o", "output")) for k in ("weight", "bias")},
                 **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}}
        for hf, g in names.items():
            if h + hf not in sd:
                continue
            w = sd[h + hf]
            if arch == "llama" and g.startswith("attn_q."):
                w = permute(w, cfg.num_attention_heads)
            elif arch == "llama" and g.startswith("attn_k."):
                w = permute(w, cfg.num_key_value_heads)
            out[b + g] = w
    return out


def write_gguf(path, hf_model, arch: str, kind: str = "F32", seed: int = 0, tokenizer: dict | None = None,
               name: str | None = None, tokens: bool = True) -> None:
    """Write ``hf_model`` as a GGUF file of architecture ``arch`` with 2-D weights stored as ``kind``.
    llama.cpp writes Mistral models as ``llama`` (transformers tells them apart by general.name "mistral")."""
    rng = np.random.default_rng(seed)
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or f"tiny-{arch}")
    if arch == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        if arch in ("llama", "mistral"):
            writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if tokens:  # transformers takes GPT-2's vocab size from it
        writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    for key, value in (tokenizer or {}).items():
        writer.add_key_value(key, *value)
    for name, w in gguf_tensors(hf_model, arch).items():
        if w.ndim == 2 and kind != "F32":
            writer.add_tensor(name, _encode(w, kind, rng), raw_dtype=Q[kind])
        else:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _encode(w: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "F16":
        return w.astype(np.float16)
    if kind == "BF16":
        return gguf.quants.quantize(w.astype(np.float32), Q.BF16)
    if kind in GGUF_CAN_QUANTIZE:
        return gguf.quants.quantize(w.astype(np.float32), Q[kind])
    return random_blocks(kind, *w.shape, rng)  # gguf-py cannot quantize K-quants: random valid blocks


def hf_reference(arch: str, *, dim: int = 64, ffn: int = 128, vocab: int = 256, tied: bool = True, seed: int = 0):
    """A random-init transformers model of ``arch`` (dims chosen by the caller to fit the block size)."""
    import transformers

    torch.manual_seed(seed)
    if arch == "gpt2":
        # transformers reads GPT-2 GGUFs with n_inner = 4 * n_embd and n_positions = 1024 whatever the file says
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=dim, n_layer=2, n_head=4,
                                      n_inner=4 * dim,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
        cfg = cls[0](vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                     rope_theta=10000.0, tie_word_embeddings=tied)
        model = cls[1](cfg)
    with torch.no_grad():  # peaked attention and non-trivial norms, so a mapping error cannot hide
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.3) + (1.0 if p.dim() == 1 and "norm" in name
                                                                             or "ln_" in name else 0.0))
    return model.eval()
