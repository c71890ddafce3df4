"""The trainer's AdamW, and the variant that steps inside the backward.

:class:`AdamWInBackward` updates each parameter as soon as its gradient is complete (a
``register_post_accumulate_grad_hook``) and frees that gradient, so the whole model's gradients
never exist at once: 4 bytes per trainable parameter off the peak of full fine-tuning, which
sits at the end of the backward. The update is AdamW's, parameter by parameter, with two limits
that follow from stepping before the backward ends: no clipping to the global gradient norm (it
is known only after the last gradient) and one backward per step (no micro-batch accumulation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel: the same update as the default multi-tensor
    one up to float rounding, without its temporaries (each a copy of every parameter; on
    SmolLM2's full fine-tuning the step's peak was 513 MiB lower) and several times faster.
    Sharded (DTensor) or other tensor subclasses keep the multi-tensor path."""
    fused = all(
        type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
        for p in params
    )
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class AdamWInBackward(torch.optim.Optimizer):
    """AdamW run by the backward, one parameter at a time.

    A scheduler drives it as any optimizer: the hooks read this optimizer's one param group's
    learning rate at every update. :meth:`step` and :meth:`zero_grad` have nothing left to do.
    :meth:`state_dict` is in :class:`torch.optim.AdamW`'s layout (state by parameter index,
    one group), so checkpoints load into either. Call :meth:`close` to remove the hooks.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float):
        params = list(params)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self._each = [adamw([p], lr, weight_decay) for p in params]
        self._squares: list[torch.Tensor] = []
        self._handles = [
            p.register_post_accumulate_grad_hook(self._updater(each))
            for p, each in zip(params, self._each, strict=True)
        ]

    def _updater(self, each: torch.optim.AdamW) -> Callable[[torch.Tensor], None]:
        def update(param: torch.Tensor) -> None:
            grad = param.grad
            assert grad is not None, "post-accumulate hook without a gradient"
            self._squares.append(torch.linalg.vector_norm(grad).square())
            each.param_groups[0]["lr"] = self.param_groups[0]["lr"]
            each.step()
            param.grad = None  # the point: this gradient's memory goes back now

        return update

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Nothing to do: the backward updated every parameter that got a gradient."""
        if closure is not None:
            raise ValueError("AdamWInBackward takes no closure: the backward runs the update")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient was freed once applied."""

    def take_grad_norm(self) -> float:
        """The L2 norm of the gradients applied since the last call (unclipped)."""
        total = float(sum(s.item() for s in self._squares))
        self._squares.clear()
        return math.sqrt(total)

    def state_dict(self) -> dict[str, Any]:
        group = {**self._each[0].param_groups[0], **self.param_groups[0]}
        group["params"] = list(range(len(self._each)))
        state = {}
        for i, each in enumerate(self._each):
            if saved := each.state_dict()["state"]:  # none before the parameter's first update
                state[i] = saved[0]
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        (group,) = state_dict["param_groups"]
        if len(group["params"]) != len(self._each):
            raise ValueError(
                f"the state holds {len(group['params'])} parameters, this optimizer "
                f"{len(self._each)}"
            )
        settings = {k: v for k, v in group.items() if k != "params"}
        self.param_groups[0].update(
            {k: v for k, v in settings.items() if k in self.param_groups[0] or k == "initial_lr"}
        )
        for index, each in zip(group["params"], self._each, strict=True):
            saved = state_dict["state"].get(index)
            each.load_state_dict(
                {
                    "state": {} if saved is None else {0: saved},
                    "param_groups": [{**settings, "params": [0]}],
                }
            )

    def close(self) -> None:
        """Remove the hooks: later backwards leave the parameters alone."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def build_adamw(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, in_backward: bool = False
) -> torch.optim.Optimizer:
    """:func:`adamw`, or with ``in_backward`` :class:`AdamWInBackward` (what
    ``TrainConfig.optimizer_in_backward`` asks for)."""
    if in_backward:
        return AdamWInBackward(params, lr, weight_decay)
    return adamw(params, lr, weight_decay)
