"""The reference's final hidden states of the KL rows, computed once before the first step.

The KL reference is frozen: the base model with the adapter disabled (LoRA) or a copy of the
initial weights (full fine-tuning), in eval mode. Its output for a given row is therefore the
same at every step, and a flagged row's reference forward in the step loop repeats work done
before whenever the row comes round again (every epoch after the first, and every validation).
:class:`CachedReference` runs that forward once per distinct flagged row, before training, and
keeps the final hidden states ``[tokens, hidden]`` (what the fused loss projects through the
reference's head), not the logits: ``hidden / vocabulary`` of their size (576 / 49,152 for
SmolLM2, 4,096 / 128,256 for Llama 3).

What it buys:

* Full fine-tuning no longer needs the frozen copy's decoder during training, only its head: the
  caller drops the copy, which takes one model's weights off the training peak.
* The step loop runs one forward per micro-batch whatever its flags; the reference's work is paid
  once per row rather than once per row and epoch.

What it costs: host memory for the states, ``4 * hidden`` bytes per token of every flagged row
(float32; see :func:`cache_bytes`), and, in a one-epoch run, the same reference forwards as the
step loop would run, only earlier (batched by length, so with less padding).

A row is found by its real tokens (the ids under the attention mask): the same tokens give the same
reference output, wherever the row sits in a micro-batch and however wide the micro-batch is
padded (right padding leaves the real positions' ids and positions alone). The states are taken
under the same autocast as the step's, so they equal what the step loop's forward would return up
to the float rounding of a differently shaped batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

from trainer.data import Batch, TrainExample, collate

log = logging.getLogger(__name__)

ReferenceOutputs = Callable[[Batch, int, bool], torch.Tensor]
"""``reference(batch, keep, hidden)``, as :func:`trainer.forward.outputs` takes them."""


def _key(ids: torch.Tensor) -> bytes:
    return ids.detach().to("cpu", torch.long).numpy().tobytes()


def cache_bytes(examples: Iterable[TrainExample], hidden_size: int, element_bytes: int = 4) -> int:
    """Bytes :meth:`CachedReference.build` holds for the flagged ones of ``examples``."""
    tokens = {tuple(e.input_ids): len(e.input_ids) for e in examples if e.kl_flag}
    return sum(tokens.values()) * hidden_size * element_bytes


class CachedReference:
    """A drop-in for the live reference function that answers the cached rows from memory.

    ``fallback`` (the live reference) answers rows that are not cached; without it such a row is
    an error, which is what full fine-tuning wants once it has dropped its frozen copy."""

    def __init__(
        self, states: dict[bytes, torch.Tensor], fallback: ReferenceOutputs | None = None
    ) -> None:
        self.states = states
        self.fallback = fallback

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        reference: ReferenceOutputs,
        examples: Sequence[TrainExample],
        pad_id: int,
        device: torch.device,
        batch_rows: int,
        autocast_dtype: torch.dtype | None = None,
        fallback: ReferenceOutputs | None = None,
    ) -> CachedReference:
        """Run ``reference`` once over every distinct flagged row of ``examples``, ``batch_rows``
        rows at a time and longest first (similar lengths together: little padding), under
        autocast to ``autocast_dtype`` when it is given (as the step loop's forwards are)."""
        unique: dict[bytes, TrainExample] = {}
        for example in examples:
            if example.kl_flag:
                unique.setdefault(_key(torch.tensor(example.input_ids)), example)
        rows = sorted(unique.values(), key=lambda e: -len(e.input_ids))
        states: dict[bytes, torch.Tensor] = {}
        # On an accelerator the states wait in host memory, so that they take none of its own.
        keep_on = torch.device("cpu")
        total_tokens = sum(len(e.input_ids) for e in rows)
        log.info("reference cache: %d flagged rows, %d tokens", len(rows), total_tokens)
        for start in range(0, len(rows), max(batch_rows, 1)):
            chunk = rows[start : start + batch_rows]
            batch = collate(chunk, pad_id).to(device)
            width = batch.input_ids.shape[1]
            with torch.autocast(
                device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                hidden = reference(batch, width, True)
            for row, example in enumerate(chunk):
                n = len(example.input_ids)
                # A copy, not a view: a view would keep the whole padded batch alive.
                states[_key(torch.tensor(example.input_ids))] = hidden[row, :n].to(
                    keep_on, copy=True
                )
            done = min(start + batch_rows, len(rows))
            log.info("reference cache: %d of %d rows", done, len(rows))
        return cls(states, fallback)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states.values())

    def __call__(self, batch: Batch, keep: int, hidden: bool) -> torch.Tensor:
        """The last ``keep`` positions' final hidden states of every row of ``batch``."""
        lengths = batch.attention_mask.sum(1).tolist()
        found = (
            [self.states.get(_key(batch.input_ids[row, :n])) for row, n in enumerate(lengths)]
            if hidden
            else []
        )
        if not hidden or any(s is None for s in found):
            if self.fallback is None:
                raise KeyError(
                    "a reference row is not in the cache and there is no live reference "
                    "(full fine-tuning drops its frozen copy once the KL rows are cached)"
                )
            return self.fallback(batch, keep, hidden)
        width = batch.input_ids.shape[1]
        first = found[0]
        assert first is not None
        out = torch.zeros(
            (len(found), width, first.shape[-1]), dtype=first.dtype, device=batch.input_ids.device
        )
        for row, states in enumerate(found):
            assert states is not None
            out[row, : states.shape[0]] = states.to(out.device, non_blocking=True)
        return out[:, width - keep :]
