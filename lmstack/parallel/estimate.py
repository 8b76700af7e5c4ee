"""How much memory and time one training step takes per GPU under a layout: the model behind the worked
plans of docs/parallel.md (``python benchmarks/parallel_plans.py`` prints them), before any GPU is rented.

Memory (bf16 mixed precision, Adam; the ZeRO paper's K = 12, Rajbhandari et al. 2020): per parameter 2 bytes of
bf16 weights, 2 of bf16 gradients and 12 of fp32 master weights and Adam moments. DDP keeps all 16, ZeRO-1
shards the 12, ZeRO-2 also the gradients, ZeRO-3 (FSDP) everything; tensor parallelism divides all of it by t.
Activations (Korthikanti et al. 2022, sec. 4, with flash attention, so no s^2 term): a layer keeps
s h (10 + 24 / t) bytes per sequence of s tokens; with activation checkpointing only each layer's input (2 s h)
is kept, plus one layer's full set while it is recomputed.

Time: 6 P FLOPs per token (8 P with checkpointing: the forward runs twice) at ``mfu`` of the GPU's peak. Data
parallel traffic per GPU, ring collectives: ZeRO-3 all-gathers the bf16 weights in forward and in backward
and reduce-scatters the gradients, for every micro-batch (3 x 2 P bytes); DDP / ZeRO-1 / ZeRO-2 move the
gradients once per step (2 x 2 P: an all-reduce, or a reduce-scatter then the weights' all-gather). It
overlaps compute. Tensor parallel traffic: per layer two all-reduces of the (tokens, h) activations in
forward and two in backward (two more when recomputing), on the critical path. Communication beside compute:
``step = max(compute, data-parallel traffic) + tensor-parallel traffic``. Attention FLOPs, the LM head and
latency are left out: it is a model for choosing a layout, good to tens of percent, not a benchmark.
"""

from dataclasses import dataclass

from lmstack.errors import ConfigError

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


@dataclass(frozen=True)
class ModelShape:
    """A decoder's size: parameters, layers, hidden width, and the training sequence length."""

    params: float
    layers: int
    dim: int
    seq_len: int = 4096


LLAMA_7B = ModelShape(params=6.74e9, layers=32, dim=4096)
LLAMA_70B = ModelShape(params=70.6e9, layers=80, dim=8192)


@dataclass(frozen=True)
class Hardware:
    """A GPU cluster: memory per GPU, bf16 dense peak, the fraction of it reached, and the bus bandwidth one
    GPU gets in a collective inside a node (NVLink) and across nodes (InfiniBand). Defaults: H100 SXM 80 GB,
    8 per node, 400 Gb/s InfiniBand per GPU."""

    memory_bytes: float = 80e9
    peak_flops: float = 989e12
    mfu: float = 0.4
    node_bandwidth: float = 300e9
    network_bandwidth: float = 45e9
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Estimate:
    """Per GPU: bytes of model states and of activations, whether they fit, and seconds per step."""

    states_bytes: float
    activation_bytes: float
    fits: bool
    micro_batches: int
    compute_s: float
    data_parallel_s: float
    tensor_parallel_s: float

    @property
    def total_bytes(self) -> float:
        return self.states_bytes + self.activation_bytes

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.data_parallel_s) + self.tensor_parallel_s


def state_bytes(params: float, strategy: str, dp: int, tp: int = 1) -> float:
    """Model-state bytes per GPU (bf16 weights and gradients, fp32 master weights and Adam moments)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    weights, grads, optimizer = 2 * params / tp, 2 * params / tp, 12 * params / tp
    sharded = {"ddp": 0.0, "zero1": optimizer, "zero2": optimizer + grads, "zero3": optimizer + grads + weights}
    return weights + grads + optimizer - sharded[strategy] * (1 - 1 / dp)


def estimate(shape: ModelShape, gpus: int, tp: int = 1, strategy: str = "zero3", micro_batch: int = 1,
             global_batch_tokens: float = 4 * 2**20, checkpointing: bool = True,
             hardware: Hardware = Hardware()) -> Estimate:
    """One step of ``global_batch_tokens`` on ``gpus`` GPUs: tensor parallel degree ``tp`` inside a node, the
    rest data parallel with ``strategy``, ``micro_batch`` sequences per data-parallel group at a time.

    Raises:
        ConfigError: ``tp`` does not divide ``gpus`` or spans nodes; the batch has fewer sequences than the
            data-parallel groups need for one micro-batch each.
    """
    if tp < 1 or gpus % tp:
        raise ConfigError(f"tp={tp} does not divide {gpus} GPUs")
    if tp > hardware.gpus_per_node:
        raise ConfigError(f"tp={tp} spans nodes of {hardware.gpus_per_node} GPUs: its all-reduces would cross "
                          "the network every layer; keep tensor parallelism inside a node")
    dp, s, h, layers = gpus // tp, shape.seq_len, shape.dim, shape.layers
    sequences = global_batch_tokens / s
    micro_batches = int(sequences // (dp * micro_batch))
    if micro_batches < 1:
        raise ConfigError(f"a global batch of {sequences:.0f} sequences cannot give {dp} data-parallel groups "
                          f"{micro_batch} each; use fewer GPUs, more tensor parallelism, or a larger batch")
    layer_full = s * h * (10 + 24 / tp) * micro_batch
    layer_input = 2 * s * h * micro_batch
    activations = layers * layer_input + layer_full if checkpointing else layers * layer_full
    states = state_bytes(shape.params, strategy, dp, tp)
    tokens_per_group = micro_batches * micro_batch * s
    compute = (8 if checkpointing else 6) * shape.params * tokens_per_group / tp / (
        hardware.peak_flops * hardware.mfu)
    bandwidth = hardware.node_bandwidth if gpus <= hardware.gpus_per_node else hardware.network_bandwidth
    ring = (dp - 1) / dp
    traffic = 3 * 2 * shape.params / tp * micro_batches if strategy == "zero3" else 2 * 2 * shape.params / tp
    all_reduces = 6 if checkpointing else 4
    tp_traffic = (all_reduces * layers * micro_batches * 2 * (tp - 1) / tp * 2 * s * h * micro_batch) if tp > 1 else 0
    return Estimate(states_bytes=states, activation_bytes=activations,
                    fits=states + activations <= 0.9 * hardware.memory_bytes,  # 10% for the allocator, buffers
                    micro_batches=micro_batches, compute_s=compute, data_parallel_s=traffic * ring / bandwidth,
                    tensor_parallel_s=tp_traffic / hardware.node_bandwidth)
