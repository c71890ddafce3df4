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
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "sarft_prefix"


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
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    prefix_k, prefix_v = prefix.layer(module.layer_idx)

    # Query heads kv*group .. kv*group+group-1 share kv head kv (repeat_kv's order).
    folded = (
        query.reshape(batch, kv_heads, group * length, dim)
        .transpose(0, 1)
        .reshape(1, kv_heads, batch * group * length, dim)
    )
    out_p, lse_p = flash(folded, prefix_k, prefix_v, 0.0, False, scale=scale)
    out_p = out_p.reshape(kv_heads, batch, group * length, dim).transpose(0, 1)
    out_p = out_p.reshape(batch, heads, length, dim)
    lse_p = lse_p.reshape(kv_heads, batch, group * length).transpose(0, 1)
    lse_p = lse_p.reshape(batch, heads, length)

    out_s, lse_s = flash(
        query.contiguous(), repeat_kv(key, group), repeat_kv(value, group), 0.0, True, scale=scale
    )
    lse = torch.logaddexp(lse_p, lse_s)
    merged = (
        out_p.float() * torch.exp(lse_p - lse)[..., None]
        + out_s.float() * torch.exp(lse_s - lse)[..., None]
    )
    return merged.to(query.dtype).transpose(1, 2).contiguous(), None


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
