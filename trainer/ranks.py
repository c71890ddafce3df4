"""The processes of a data-parallel run, as the training loop needs them: which one writes, how
their numbers are summed, and how they agree. One process (no accelerator) is a world of one.

The processes are started by ``accelerate launch`` (or ``torchrun``); :class:`Ranks` takes the
``accelerate.Accelerator`` they built, which set up the process group (gloo on CPU, NCCL on GPU).
The policy is then wrapped in DistributedDataParallel, or, when the accelerate config file has
an ``fsdp_config``, sharded with FSDP2 (``fully_shard``) following that config.

FSDP runs as ZeRO-2 (``fsdp_reshard_after_forward: false``, the paper's DeepSpeed stage) or
ZeRO-3 (``true``). ZeRO-2: parameters, gradients and optimizer state are sharded between
optimizer steps; during a step every process holds the whole parameters, so its forwards
(policy and reference alike) need no collective, and the one reduce-scatter per step comes in
its last backward; the processes may run different numbers of micro-batches and references.
ZeRO-3: the parameters are resharded after each unit's forward and backward and all-gathered
again for the next, so every forward and backward is collective: the processes must run the
same sequence of them (:attr:`Ranks.lockstep`; the training loop pads the micro-batches and
pairs the reference forwards).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

DEEPSPEED = "DistributedType.DEEPSPEED"
FSDP = "DistributedType.FSDP"


@dataclass(frozen=True)
class FsdpSettings:
    """What the FSDP2 sharding takes from accelerate's FSDP plugin."""

    plugin: Any  # accelerate.utils.FullyShardedDataParallelPlugin

    @classmethod
    def of(cls, accelerator: Any) -> FsdpSettings | None:
        """The run's FSDP config, if its accelerate config file asked for FSDP."""
        if str(accelerator.distributed_type) == FSDP:
            return cls(accelerator.state.fsdp_plugin)
        # On CPU accelerate keeps its multi-CPU (DDP) mode and ignores the fsdp_config that
        # ``accelerate launch`` put in the environment: read it as accelerate does on GPU.
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            from accelerate.utils import FullyShardedDataParallelPlugin

            return cls(FullyShardedDataParallelPlugin())
        return None

    @property
    def reshard_after_forward(self) -> bool:
        """ZeRO-3 (True) or ZeRO-2 (False); accelerate makes FSDP2's setting a bool."""
        return bool(self.plugin.reshard_after_forward)

    def check(self) -> None:
        plugin = self.plugin
        if plugin.fsdp_version != 2:
            raise ValueError(
                "sarft's FSDP is FSDP2: set fsdp_version: 2 in the accelerate config's fsdp_config"
            )
        if plugin.activation_checkpointing:
            raise ValueError("fsdp_activation_checkpointing is not supported; set it false")

    def shard(self, model: Any) -> None:
        """Shard ``model`` in place: one FSDP unit per auto-wrapped layer, and the root."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
        from accelerate.utils.other import get_module_children_bottom_up
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        plugin = self.plugin
        kwargs: dict[str, Any] = {
            "reshard_after_forward": self.reshard_after_forward,
            "offload_policy": plugin.cpu_offload,
            "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        }
        plugin.set_auto_wrap_policy(model)
        wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
        if wrap is not None:
            for module in get_module_children_bottom_up(model)[:-1]:
                if wrap(module) and not isinstance(module, FSDPModule):
                    fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)


def _meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its parameters on the meta device (no memory) and its buffers
    copied: the module a gathered state dict is loaded into."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = torch.nn.Parameter(
            param.detach().to("meta"), requires_grad=param.requires_grad
        )
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().clone()
    return copy.deepcopy(model, memo)


def _load_assigned(skeleton: torch.nn.Module, state: Mapping[str, Any]) -> torch.nn.Module:
    """A plain module holding ``state``; tied parameters stay tied."""
    model = copy.deepcopy(skeleton)
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    model.load_state_dict(state, strict=False, assign=True)
    for names in aliases.values():
        # A gathered state dict may hold a tied parameter under one of its names only.
        loaded = [model.get_parameter(n) for n in names]
        first = next((p for p in loaded if not p.is_meta), loaded[0])
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"the gathered state dict lacks {still_meta[:5]}")
    return model


def _indexed(named: dict[str, Any]) -> dict[str, Any]:
    """A state dict keyed by parameter names (DCP's) keyed as ``Optimizer.state_dict`` keys it:
    by position, so that a checkpoint resumes with or without sharding."""
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        positions = [index.setdefault(n, len(index)) for n in group["params"]]
        groups.append({**group, "params": positions})
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def _named(indexed: dict[str, Any], names: list[str]) -> dict[str, Any]:
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]
    return {"state": {names[i]: s for i, s in indexed["state"].items()}, "param_groups": groups}


@dataclass
class Ranks:
    accelerator: Any | None = None
    _fsdp: FsdpSettings | None = field(default=None, init=False, repr=False)
    _skeleton: torch.nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world > 1:
            self._fsdp = FsdpSettings.of(self._acc)

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else int(self.accelerator.process_index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """The policy's parameters, gradients and optimizer state are split among the
        processes (FSDP): saving them takes every process."""
        return self._fsdp is not None

    @property
    def lockstep(self) -> bool:
        """Every forward and backward of the policy's module is a collective (FSDP ZeRO-3:
        each unit all-gathers its parameters): the processes must run the same number of
        micro-batches, and the same reference forwards through that module, in each step."""
        return self._fsdp is not None and self._fsdp.reshard_after_forward

    @property
    def _acc(self) -> Any:
        assert self.accelerator is not None  # only asked for with several processes
        return self.accelerator

    def wrap(self, policy: Any) -> Any:
        """The module the training forwards go through: DDP across several processes, or the
        policy itself sharded in place (FSDP). Build the optimizer after this, over
        ``policy.parameters()``: under FSDP they are the process's shards."""
        if self.world == 1:
            return policy
        kind = str(self._acc.distributed_type)
        # On CPU accelerate ignores a deepspeed_config as it does an fsdp_config: it would
        # silently run data parallel.
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            kind = DEEPSPEED
        if kind == DEEPSPEED:
            raise ValueError(
                f"accelerate's {kind} is not supported by sarft's training loop: DeepSpeed "
                "owns the optimizer and the backward, which this loop runs itself; use FSDP "
                "(examples/accelerate/fsdp.yaml: ZeRO-2, fsdp-zero3.yaml: ZeRO-3) or data "
                "parallel (no fsdp_config or deepspeed_config in the accelerate file)"
            )
        if self._fsdp is None:
            return self._acc.prepare_model(policy)
        self._fsdp.check()
        # As DDP does: every process starts from the main one's weights.
        for tensor in [*policy.parameters(), *policy.buffers()]:
            dist.broadcast(tensor.data, src=0)
        if self.is_main:
            self._skeleton = _meta_skeleton(policy)
        self._fsdp.shard(policy)
        return policy

    def no_sync(self, model: Any, sync: bool) -> AbstractContextManager[Any]:
        """Accumulate gradients locally unless ``sync``: one all-reduce (DDP) or reduce-scatter
        (FSDP) per optimizer step."""
        if self.world == 1:
            return nullcontext()
        if self._fsdp is not None:
            return _fsdp_accumulate(model, sync, keep_whole=not self.lockstep)
        if sync:
            return nullcontext()
        return self._acc.no_sync(model)

    def clip_grad_norm(self, params: Iterable[torch.Tensor], max_norm: float | None) -> float:
        """Clip the step's gradients to ``max_norm`` (None: leave them); the norm over the
        whole gradient (under FSDP the shards' norms are combined across the processes)."""
        params = list(params)
        if max_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self._fsdp is not None:
            from torch.distributed.tensor import DTensor

            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
        return float(norm)

    def plain(self, policy: Any, on_device: bool = False) -> Any:
        """The policy as one process's module with the whole weights, on the main process
        (None on the others); collective under FSDP, ``policy`` itself otherwise. Gathered
        weights are on the CPU unless ``on_device`` (the accelerator's device)."""
        if self._fsdp is None:
            return policy
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(policy, options=options)
        if not self.is_main:
            return None
        assert self._skeleton is not None
        model = _load_assigned(self._skeleton, state)
        return model.to(self._acc.device) if on_device else model

    def optimizer_state(self, policy: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` of the whole parameters (gathered on the main process
        under FSDP, where the others get an empty one); collective under FSDP."""
        if self._fsdp is None:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        named = get_optimizer_state_dict(policy, optimizer, options=options)
        return _indexed(dict(named)) if self.is_main else {}

    def load_optimizer_state(
        self, policy: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load what :meth:`optimizer_state` returned (each process passes the whole state)."""
        if self._fsdp is None:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        # The optimizer was built over the trainable parameters in this order.
        names = [n for n, p in policy.named_parameters() if p.requires_grad]
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(policy, optimizer, _named(state, names), options=options)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._acc.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.tolist()]

    def agree(self, flag: bool) -> bool:
        """The main process's ``flag`` on every process (e.g. a cancel it read)."""
        if self.world == 1:
            return flag
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def barrier(self) -> None:
        if self.world > 1:
            self._acc.wait_for_everyone()


@contextmanager
def _fsdp_accumulate(model: Any, sync: bool, keep_whole: bool) -> Iterator[None]:
    # The gradients accumulate unsharded until the syncing backward reduce-scatters them. With
    # ``keep_whole`` (ZeRO-2) the parameters also stay whole between the syncing backwards (no
    # re-gather, so no collective in the next forwards) and the syncing one reshards them for
    # the optimizer step; under ZeRO-3 every backward reshards them, as every forward does.
    model.set_requires_gradient_sync(sync)
    if keep_whole:
        model.set_reshard_after_backward(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        if keep_whole:
            model.set_reshard_after_backward(True)
