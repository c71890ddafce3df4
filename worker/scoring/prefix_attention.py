"""Attention over one cached prefix shared by a batch, plus each row's causal suffix.

One flash-attention call per batch: each row's keys are the prefix's (shared,
expanded) followed by its own, under one ``[T, P + T]`` additive mask that opens
the whole prefix and the causal part of the suffix. The transformers cache path
builds the same keys through a cache object and a 4-D mask per batch; this
needs neither.

Registered with transformers' attention interface under ``ATTENTION_NAME`` for
the module path, and called directly by the fused forward; CPU only.
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
        return k[:, :, : self.length], v[:, :, : self.length]


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
) -> torch.Tensor:
    """Causal attention of ``[B, heads, T, D]`` queries over ``[B, kv_heads, T, D]`` keys.

    Returns ``[B, heads, T, D]``, a view of a ``[B, T, heads, D]`` buffer (the
    flash kernel's layout). The kernel takes grouped kv heads and strided inputs.
    """
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    return _FLASH(query, key, value, 0.0, True, scale=scale)[0]


def prefix_causal_mask(
    prefix_len: int, length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``[T, P + T]`` additive mask: every query sees the prefix and its suffix up to itself."""
    mask = torch.zeros(length, prefix_len + length, dtype=dtype, device=device)
    causal = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)
    mask[:, prefix_len:] = causal
    return mask


def attend_with_prefix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a prefix ``[1, kv_heads, P, D]`` shared by the batch, then causal.

    Returns ``[B, heads, T, D]`` in the flash kernel's ``[B, T, heads, D]`` layout.
    ``mask`` is ``prefix_causal_mask(P, T, ...)``, built here if not given.
    """
    batch, _, length, dim = query.shape
    scale = scale if scale is not None else dim**-0.5
    prefix_len = prefix_k.shape[2]
    keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix_v.expand(batch, -1, -1, -1), value], dim=2)
    if mask is None:
        mask = prefix_causal_mask(prefix_len, length, query.dtype, query.device)
    return _FLASH(query, keys, values, 0.0, False, attn_mask=mask, scale=scale)[0]


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
