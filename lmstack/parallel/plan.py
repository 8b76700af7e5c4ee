"""``parallelize(model, config, world)``: the one place the distributed transforms are composed, in the one
order that works (torchtitan's): tensor parallel -> activation checkpointing -> compile -> FSDP / DDP, or
pipeline stages. It returns a ``Parallelized``: what the Trainer needs to run, clip, log and checkpoint the
transformed model without knowing which strategy it is.

The mesh is (pp, dp, tp) over the world, tp innermost (the ranks that talk most are neighbours).
Compositions: any dp strategy alone; tp alone; dp x tp with FSDP2 (zero2 / zero3 over "dp", TP over "tp");
pp alone (stages over the world).
"""

import inspect
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lmstack.errors import ConfigError
from lmstack.nn.checkpointing import blocks, checkpoint_layers_
from lmstack.parallel.config import ParallelConfig
from lmstack.parallel.data import RankSlice
from lmstack.parallel.data_parallel import HiddenStatesView, TrainingView, apply_ddp, apply_fsdp, zero1_optimizer
from lmstack.parallel.launch import World, peer_failures
from lmstack.parallel.pipeline import DecoderStage, PipelineForward, build_schedule, check_pipeline, stage_layers
from lmstack.parallel.tensor import apply_tensor_parallel, check_tensor_parallel, tensor_parallel_plan, \
    uses_loss_parallel


def training_view(wrapped: nn.Module, model: nn.Module, fused_head: bool) -> TrainingView:
    """What the objective runs: ``wrapped`` (DDP, FSDP or the model itself). With ``fused_head`` (the head is
    not split by tensor parallelism), a plain ``nn.Linear`` head and a ``forward`` that can return hidden
    states, also ``hidden_states`` and the head, so the objective fuses head and loss as in one process (FSDP
    keeps the root, head included, gathered from forward to backward)."""
    head = getattr(model, "lm_head", None)
    if (fused_head and type(head) is nn.Linear and hasattr(model, "hidden_states")
            and "return_hidden" in inspect.signature(model.forward).parameters):
        return HiddenStatesView(wrapped, model)
    return TrainingView(wrapped, model.config)


def compile_blocks_(model: nn.Module, inside_checkpoint: bool = False) -> None:
    """``torch.compile`` each block of ``model`` in place (a checkpointed block: the checkpoint with it).

    ``inside_checkpoint`` compiles each block's sub-modules (attention, MLP, norms) instead, leaving the
    checkpoint itself eager: AOTAutograd (torch 2.13) cannot compile a checkpointed tensor-parallel block
    (it saves the DeviceMesh for backward: "expected all tensors_saved_with_vc_check to be Tensors").
    """
    for block in blocks(model):
        for module in block.children() if inside_checkpoint else (block,):
            module.compile()


def check_layout(model: nn.Module, config: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(pp, dp, tp) after checking the world factors and the model can be split that way (same answer on
    every rank, before any collective, so a bad layout stops every rank with the same message)."""
    pp, dp, tp = config.degrees(world_size)
    if pp > 1 and (dp > 1 or tp > 1):
        raise ConfigError(f"pipeline parallelism runs alone here (parallel.pp={pp} with dp={dp}, tp={tp}); set "
                          "parallel.dp 1 and parallel.tp 1, or parallel.pp 1")
    if tp > 1 and dp > 1 and config.strategy in ("ddp", "zero1"):
        raise ConfigError(f"dp x tp composes with FSDP2: set parallel.strategy zero2 or zero3 (got {config.strategy})")
    if tp > 1:
        tensor_parallel_plan(model)
        check_tensor_parallel(model, tp)
    if pp > 1:
        check_pipeline(model)
        stage_layers(model.config.n_layers, pp)
    return pp, dp, tp


class Parallelized:
    """A model transformed for a distributed run, and the few operations that differ by strategy.

    Attributes:
        module: what the objective calls (a ``TrainingView`` over DDP / the FSDP or TP model), or None on
            pipeline stages (the schedule runs them).
        params_module: the module whose parameters this rank trains and checkpoints (the model, or its stage).
        world, config, pp, dp, tp: the launch and its degrees; dp_rank: this rank's data-parallel index.
    """

    def __init__(self, model: nn.Module, config: ParallelConfig, world: World, seed: int) -> None:
        self.config, self.world = config, world
        self.pp, self.dp, self.tp = check_layout(model, config, world.world_size)
        self.mesh = init_device_mesh(world.device.type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
        self.dp_rank, self.pp_rank = self.mesh["dp"].get_local_rank(), self.mesh["pp"].get_local_rank()
        # Dropout differs between data-parallel replicas and pipeline stages; tensor-parallel ranks hold the
        # same activations and must draw the same masks.
        torch.manual_seed(seed + 1_000_003 * (1 + self.dp_rank + self.dp * self.pp_rank))
        model = model.to(world.device)
        self.schedule = None
        if self.tp > 1:
            apply_tensor_parallel(model, self.mesh["tp"])
        if self.pp > 1:
            model = self._stage(model)
        if config.activation_checkpointing:
            checkpoint_layers_(model)
        if config.compile:
            compile_blocks_(model, inside_checkpoint=config.activation_checkpointing and self.tp > 1)
        self.params_module = model
        if self.pp > 1:
            self.module = None
        else:
            if config.strategy in ("zero2", "zero3"):
                wrapped = apply_fsdp(model, self.mesh["dp"], config.strategy == "zero3")
            else:
                wrapped = apply_ddp(model, self.mesh["dp"]) if self.dp > 1 else model
            self.module = training_view(wrapped, model, fused_head=self.tp == 1)
        self.loss_parallel = uses_loss_parallel(model)
        self.eval_module = self.module or PipelineForward(self.params_module, self.pp_rank, self.pp,
                                                          self.mesh["pp"].get_group())

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    @property
    def layout(self) -> dict:
        return {"world_size": self.world.world_size, "pp": self.pp, "dp": self.dp, "tp": self.tp,
                "strategy": self.config.strategy}

    # --- setup ---------------------------------------------------------------------------------------

    def _stage(self, model: nn.Module) -> DecoderStage:
        ranges = stage_layers(model.config.n_layers, self.pp)
        last = self.pp_rank == self.pp - 1
        return DecoderStage(model, ranges[self.pp_rank], first=self.pp_rank == 0, last=last)

    def shard_data(self, source):
        """This rank's slice of every batch of ``source`` (the global order stays the single-process one)."""
        return RankSlice(source, self.dp_rank, self.dp)

    def make_optimizer(self, groups: list[dict], **adamw) -> torch.optim.Optimizer:
        """AdamW over ``groups`` (ZeRO-1: its state split over the data-parallel ranks). The fused kernel needs
        plain tensors; DTensor parameters (FSDP, TP) take the foreach one (the same update up to rounding), each
        group split into its DTensor and its plain parameters (same hyper-parameters)."""
        if self.config.strategy == "zero1" and self.dp > 1:
            return zero1_optimizer(groups, self.mesh["dp"], **adamw)
        plain = not any(isinstance(p, DTensor) for g in groups for p in g["params"])
        if not plain:  # foreach kernels take one kind per list: tensor-parallel layers beside plain norms / biases
            groups = [{**g, "params": kind} for g in groups
                      for kind in ([p for p in g["params"] if isinstance(p, DTensor)],
                                   [p for p in g["params"] if not isinstance(p, DTensor)]) if kind]
        return torch.optim.AdamW(groups, fused=plain, foreach=None if plain else True, **adamw)

    # --- one step ------------------------------------------------------------------------------------

    def loss_context(self):
        """Where losses are computed: the vocabulary-parallel cross-entropy when the logits are sharded."""
        if self.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel
            return loss_parallel()
        return nullcontext()

    def forward_backward(self, objective, batch, scale: float) -> tuple[float, dict]:
        """Backward of one micro-batch's ``loss * scale`` on every rank; returns (``loss * scale`` averaged
        over the data-parallel ranks, this rank's metrics)."""
        with peer_failures(self.world.rank):
            if self.pp > 1:
                return self._pipeline_step(objective, batch, scale)
            with self.loss_context():
                loss, metrics = objective(self.module, batch)
                (loss * scale).backward()
            return self._mean_over("dp", _scalar(loss) * scale), metrics

    def sum_over_dp(self, value: int) -> int:
        """``value`` summed over the data-parallel ranks (the step's scored tokens)."""
        with peer_failures(self.world.rank):
            return round(self._sum_over("dp", value))

    def _pipeline_step(self, objective, batch, scale: float) -> tuple[float, dict]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2) or not hasattr(objective, "pipeline_loss"):
            raise ConfigError(f"pipeline parallelism runs (inputs, targets) language-model batches; "
                              f"{type(objective).__name__} cannot be split into stages")
        inputs, targets = batch
        if self.schedule is None:
            n = self.config.microbatches or 2 * self.pp
            if inputs.shape[0] % n:
                raise ConfigError(f"parallel.microbatches={n} does not divide the batch of {inputs.shape[0]} rows")
            loss_fn = lambda logits, t: objective.pipeline_loss(logits, t) * self._scale  # noqa: E731
            self.schedule = build_schedule(self.params_module, self.pp_rank, self.pp, self.world.device,
                                           self.mesh["pp"].get_group(), self.config.pp_schedule, n, loss_fn)
        self._scale = scale
        losses: list[torch.Tensor] = []
        first, last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        args = (inputs,) if first else ()
        self.schedule.step(*args, target=targets if last else None, losses=losses if last else None)
        value = torch.tensor(float(sum(float(x) for x in losses) / len(losses)) if last else 0.0)  # x: scaled
        dist.broadcast(value, dist.get_global_rank(self.mesh["pp"].get_group(), self.pp - 1),
                       group=self.mesh["pp"].get_group())
        tokens = int((targets != -100).sum())
        return float(value), {"tokens": tokens}

    def _mean_over(self, dim: str, value: float) -> float:
        return self._sum_over(dim, value) / self.mesh[dim].size()

    def _sum_over(self, dim: str, value: float) -> float:
        """``value`` summed over the ranks of mesh dimension ``dim`` (float64, so token counts stay exact)."""
        if self.mesh[dim].size() == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.world.device)
        dist.all_reduce(t, group=self.mesh[dim].get_group())
        return float(t)

    def reduce_metrics(self, tokens: int, logged: dict) -> tuple[int, dict]:
        """Tokens summed and the objective's numbers averaged over the data-parallel ranks (rank 0 logs them)."""
        if self.dp == 1:
            return tokens, logged
        keys = sorted(logged)
        t = torch.tensor([float(tokens)] + [float(logged[k]) for k in keys], dtype=torch.float64,
                         device=self.world.device)
        with peer_failures(self.world.rank):
            dist.all_reduce(t, group=self.mesh["dp"].get_group())
        return int(t[0]), {k: float(v) / self.dp for k, v in zip(keys, t[1:].tolist())}

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the global gradient norm (over every shard and stage) to ``max_norm``; returns the norm before."""
        with peer_failures(self.world.rank):
            return clip_grad_norm(list(self.params_module.parameters()), max_norm,
                                  self.mesh["pp"].get_group() if self.pp > 1 else None)

    def evaluate(self, objective, batches) -> dict:
        with peer_failures(self.world.rank), self.loss_context():
            return objective.evaluate(self.eval_module, batches)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, sum_group=None) -> float:
    """The 2-norm of all gradients, whatever mix of plain tensors (replicated) and DTensors (sharded over any
    mesh) holds them, plus the squares of other pipeline stages (``sum_group``); scales the gradients down to
    ``max_norm`` when it is above (as ``torch.nn.utils.clip_grad_norm_`` does). DTensors of one layout are
    reduced together (one collective per layout)."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    squares = torch.zeros((), dtype=torch.float64)
    for key, grads in groups.items():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares += float(norm) ** 2
    if sum_group is not None:
        dist.all_reduce(squares, group=sum_group)
    total = math.sqrt(float(squares))
    coef = max_norm / (total + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
    if coef < 1:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def _scalar(t: torch.Tensor) -> float:
    t = t.detach()
    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def parallelize(model: nn.Module, config: ParallelConfig, world: World, seed: int) -> Parallelized:
    """Transform ``model`` (built the same way, with the same seed, on every rank) for the launch ``world``."""
    return Parallelized(model, config, world, seed)
