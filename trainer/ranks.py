"""The processes of a data-parallel run, as the training loop needs them: which one writes, how
their numbers are summed, and how they agree. One process (no accelerator) is a world of one.

The processes are started by ``accelerate launch`` (or ``torchrun``); :class:`Ranks` takes the
``accelerate.Accelerator`` they built, which set up the process group (gloo on CPU, NCCL on GPU)
and wraps the policy in DistributedDataParallel.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

SHARDED = {"DistributedType.FSDP", "DistributedType.DEEPSPEED"}


@dataclass
class Ranks:
    accelerator: Any | None = None

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
    def _acc(self) -> Any:
        assert self.accelerator is not None  # only asked for with several processes
        return self.accelerator

    def wrap(self, policy: Any) -> Any:
        """The module the training forwards go through (DDP across several processes)."""
        if self.world == 1:
            return policy
        kind = str(self._acc.distributed_type)
        if kind in SHARDED:
            # They shard the parameters and own the optimizer, which this loop builds itself
            # on the whole parameters: a silent mismatch, so refuse it.
            raise ValueError(
                f"accelerate's {kind} is not supported by sarft's training loop yet; use "
                "data parallel (DDP: no fsdp_config or deepspeed_config in the accelerate file)"
            )
        return self._acc.prepare_model(policy)

    def no_sync(self, model: Any, sync: bool) -> AbstractContextManager[Any]:
        """Accumulate gradients locally unless ``sync``: one all-reduce per optimizer step."""
        if self.world == 1 or sync:
            return nullcontext()
        return self._acc.no_sync(model)

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
