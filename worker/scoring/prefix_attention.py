"""Attention over one cached prefix shared by a batch, plus each row's causal suffix.

The plain cache path copies the prefix keys into every batch row and runs
masked attention over prefix + suffix. Here the prefix part is a single
unmasked flash-attention call with the batch folded into the query length
(every row sees the same prefix keys), the suffix part is causal flash
attention within each row, and the two halves are merged through their
log-sum-exps. The result is the same softmax attention, without the copies and
without mask tensors.

Registered with transformers' attention interface under ``ATTENTION_NAME`` and
used only on CPU, where the flash kernel returns its log-sum-exp.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "sarft_prefix"

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class SharedPrefix:
    """Per-layer keys and values ``[1, kv_heads, length, head_dim]`` of the prefix."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv[index]
        return k[:, :, : self.length].contiguous(), v[:, :, : self.length].contiguous()


def prefix_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    prefix: SharedPrefix | None = kwargs.pop("sarft_prefix", None)
    if prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    prefix_k, prefix_v = prefix.layer(module.layer_idx)
    out = attend_with_prefix(query, key, value, prefix_k, prefix_v, scaling)
    return out.transpose(1, 2).contiguous(), None


def attend_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``[B, heads, T, D]`` queries over ``[B, kv_heads, T, D]`` keys.

    Returns the output ``[B, heads, T, D]`` (a view of a ``[B, T, heads, D]``
    buffer, as the flash kernel lays it out) and its log-sum-exp ``[B, heads, T]``.
    The CPU flash kernel takes grouped kv heads and strided inputs as they are.
    """
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out, lse = _FLASH(query, key, value, 0.0, True, scale=scale)
    return out, lse


def attend_prefix(
    query: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``[B, heads, T, D]`` queries over one prefix ``[1, kv_heads, P, D]``.

    Every query row sees the same prefix keys, so the batch folds into one long
    query per kv head (query head kv * group + j uses kv head kv, repeat_kv's
    order): one large flash call, no copy of the prefix per row.
    """
    batch, heads, length, dim = query.shape
    kv_heads = prefix_k.shape[1]
    group = heads // kv_heads
    scale = scale if scale is not None else dim**-0.5
    folded = (
        query.transpose(1, 2)
        .reshape(batch, length, kv_heads, group, dim)
        .permute(2, 0, 1, 3, 4)
        .reshape(1, kv_heads, batch * length * group, dim)
    )
    out, lse = _FLASH(folded, prefix_k, prefix_v, 0.0, False, scale=scale)
    out = out.view(kv_heads, batch, length, group, dim).permute(1, 0, 3, 2, 4)
    lse = lse.view(kv_heads, batch, length, group).permute(1, 0, 3, 2)
    return out.reshape(batch, heads, length, dim), lse.reshape(batch, heads, length)


def merge(
    first: tuple[torch.Tensor, torch.Tensor],
    second: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over two disjoint key sets, from each one's (output, log-sum-exp).

    Softmax over both = the two partial outputs weighted by their shares of the
    total mass; sigmoid(lse_2 - lse_1) is the second set's share. ``out``
    (fp32 only) receives the result in its own layout.
    """
    (out_1, lse_1), (out_2, lse_2) = first, second
    share = torch.sigmoid(lse_2 - lse_1)[..., None]
    if out_1.dtype != torch.float32:
        return torch.lerp(out_1.float(), out_2.float(), share).to(out_1.dtype)
    return torch.lerp(out_1, out_2, share, out=out if out is not None else torch.empty_like(out_1))


def attend_with_prefix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over one shared prefix plus each row's causal suffix, ``[B, heads, T, D]``.

    The result keeps the suffix output's ``[B, T, heads, D]`` layout, so the
    caller's reshape to ``[B, T, heads * D]`` is a view.
    """
    suffix = attend_causal(query, key, value, scale)
    return merge(suffix, attend_prefix(query, prefix_k, prefix_v, scale))


def register() -> None:
    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Switch the attention function for the duration of one forward."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
