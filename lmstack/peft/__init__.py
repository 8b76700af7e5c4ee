"""Parameter-efficient fine-tuning as transforms over a plain model: LoRA, rsLoRA, DoRA, QLoRA (LoRA over an
NF4-quantized base), IA3, bottleneck adapters, prefix tuning and prompt tuning, with peft-compatible
adapter files (bottleneck adapters, which peft lacks, in lmstack's own).

    from lmstack.peft import apply_lora, save_adapter
    apply_lora(model, rank=8, alpha=16)          # the family's default targets; base weights frozen
    save_adapter(model, "out/adapter")           # peft's adapter_config.json + adapter_model.safetensors

Names are imported on first use (``lmstack.lazy``).
"""

from lmstack.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "apply": ["ParameterCount", "adapter_layers", "apply_bottleneck", "apply_ia3", "apply_lora", "apply_prefix_tuning",
              "apply_prompt_tuning", "disabled", "find_targets", "merge_", "remove_", "trainable_parameters",
              "unmerge_"],
    "bottleneck": ["BottleneckLayer"],
    "config": ["PeftSection"],
    "files": ["load_adapter", "save_adapter"],
    "ia3": ["IA3Layer"],
    "lora": ["LoRALayer"],
    "prefix": ["PrefixTuningModel"],
    "prompt": ["PromptTuningModel"],
})
