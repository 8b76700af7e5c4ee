"""Named model presets with published shapes. Each lists the config.json it was taken from.

``get_preset(name)`` returns a fresh DecoderConfig; ``build_model(name_or_config)`` builds the model.
Published parameter counts (what the model cards and checkpoints report) are in PUBLISHED_PARAMETERS and
checked by tests/models/test_presets.py.
"""

from lmstack.errors import ConfigError
from lmstack.models.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig, MoEConfig
from lmstack.nn.positions import RopeScaling


def _gpt2(dim: int, n_layers: int, n_heads: int) -> DecoderConfig:
    # https://huggingface.co/openai-community/gpt2/blob/main/config.json (and -medium, -large, -xl)
    return DecoderConfig(vocab_size=50257, dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=4 * dim,
                         max_seq_len=1024, norm="layernorm", mlp="plain", activation="gelu_tanh",
                         mlp_bias=True, qkv_bias=True, out_bias=True, position="learned", tie_embeddings=True,
                         dropout=0.1, model_type="gpt2", bos_token_id=50256, eos_token_id=50256)


def _llama3(dim: int, n_layers: int, n_heads: int, ffn_dim: int, factor: float, tied: bool) -> DecoderConfig:
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (3B, 3.1-8B likewise)
    return DecoderConfig(vocab_size=128256, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8,
                         ffn_dim=ffn_dim, max_seq_len=131072, rope_theta=500000.0,
                         rope_scaling=RopeScaling("llama3", factor, original_max_positions=8192),
                         tie_embeddings=tied, model_type="llama", bos_token_id=128000, eos_token_id=128001)


_PRESETS = {
    "gpt2": lambda: _gpt2(768, 12, 12),
    "gpt2-medium": lambda: _gpt2(1024, 24, 16),
    "gpt2-large": lambda: _gpt2(1280, 36, 20),
    "gpt2-xl": lambda: _gpt2(1600, 48, 25),
    "llama-3.2-1b": lambda: _llama3(2048, 16, 32, 8192, 32.0, tied=True),
    "llama-3.2-3b": lambda: _llama3(3072, 28, 24, 8192, 32.0, tied=True),
    "llama-3.1-8b": lambda: _llama3(4096, 32, 32, 14336, 8.0, tied=False),
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    "mistral-7b": lambda: DecoderConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=32768,
        sliding_window=4096, tie_embeddings=False, model_type="mistral", bos_token_id=1, eos_token_id=2),
    # https://huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json
    "qwen2-0.5b": lambda: DecoderConfig(
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, max_seq_len=131072,
        norm_eps=1e-6, qkv_bias=True, rope_theta=1000000.0, tie_embeddings=True, model_type="qwen2",
        bos_token_id=151643, eos_token_id=151643),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json
    "smollm2-135m": lambda: DecoderConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, max_seq_len=8192,
        rope_theta=100000.0, tie_embeddings=True, model_type="llama", bos_token_id=1, eos_token_id=2),
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
    "mixtral-8x7b": lambda: DecoderConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=32768,
        rope_theta=1000000.0, tie_embeddings=False, moe=MoEConfig(num_experts=8, expert_dim=14336, top_k=2,
                                                                   aux_loss_coef=0.02),
        model_type="mixtral", bos_token_id=1, eos_token_id=2),
    # https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json
    "qwen1.5-moe-a2.7b": lambda: DecoderConfig(
        vocab_size=151936, dim=2048, n_layers=24, n_heads=16, ffn_dim=5632, max_seq_len=8192, norm_eps=1e-6,
        qkv_bias=True, rope_theta=1000000.0, tie_embeddings=False,
        moe=MoEConfig(num_experts=60, expert_dim=1408, top_k=4, normalize_top_k=False, shared_expert_dim=5632,
                      aux_loss_coef=0.001),
        model_type="qwen2_moe", bos_token_id=151643, eos_token_id=151643),
    # https://huggingface.co/google-bert/bert-base-uncased/blob/main/config.json
    "bert-base": lambda: EncoderConfig(vocab_size=30522, dim=768, n_layers=12, n_heads=12, ffn_dim=3072,
                                       model_type="bert"),
    # https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/blob/main/config.json
    "minilm-l6": lambda: EncoderConfig(vocab_size=30522, dim=384, n_layers=6, n_heads=12, ffn_dim=1536,
                                       model_type="bert"),
    # https://huggingface.co/google-t5/t5-small/blob/main/config.json
    "t5-small": lambda: EncoderDecoderConfig(vocab_size=32128, dim=512, n_layers=6, n_heads=8, head_dim=64,
                                             ffn_dim=2048, model_type="t5"),
    # Small shapes for tests and demos (not published models).
    "tiny-gpt2": lambda: _gpt2(64, 2, 4).replace(vocab_size=512, max_seq_len=256, dropout=0.0),
    "tiny-mixtral": lambda: DecoderConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                          max_seq_len=256, moe=MoEConfig(num_experts=4, expert_dim=64, top_k=2),
                                          model_type="mixtral"),
    "tiny-llama": lambda: DecoderConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                        max_seq_len=256, model_type="llama"),
    "tiny-bert": lambda: EncoderConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=256,
                                       head="pretraining", model_type="bert"),
    "tiny-t5": lambda: EncoderDecoderConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, head_dim=16, ffn_dim=128,
                                            mlp="gated", activation="gelu_tanh", tie_embeddings=False,
                                            scale_decoder_output=False, model_type="t5"),
}

# Parameter counts as published (model cards / checkpoint metadata), tied matrices counted once.
PUBLISHED_PARAMETERS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-0.5b": 494_032_768,
    "smollm2-135m": 134_515_008,
    "mixtral-8x7b": 46_702_792_704,
    "qwen1.5-moe-a2.7b": 14_315_784_192,
    "bert-base": 109_482_240,
    "minilm-l6": 22_713_216,
    "t5-small": 60_506_624,
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> DecoderConfig | EncoderConfig | EncoderDecoderConfig:
    """A fresh model config for preset ``name`` (see ``preset_names()``)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(_PRESETS)}")
    return _PRESETS[name]()
