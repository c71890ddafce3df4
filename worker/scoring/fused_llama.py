"""A lean scoring forward for Llama-style decoders on CPU.

The same arithmetic as transformers' Llama decoder (the scorer checks it
against the model's own forward before using it), arranged for 2 busy cores:
- q/k/v is one matmul and gate/up is one: wider matmuls run nearer the
  machine's peak than 192-column ones, and half the calls. The model's own
  projections are re-pointed at views of the fused weights, so nothing is
  stored twice and the model keeps working as before;
- the activation, residual adds and rotary run in place or into one buffer
  instead of the several temporaries of the module code;
- attention after a shared prefix is one masked flash call per prefix
  (``prefix_attention.attend_with_prefix``), with no cache objects or 4-D masks.

Only decoders whose layers are exactly norm -> attention -> residual -> norm
-> gated MLP -> residual (Llama, Mistral without sliding window, Qwen2) qualify;
anything else keeps the module path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from worker.scoring.prefix_attention import (
    SharedPrefix,
    attend_causal,
    attend_with_prefix,
    prefix_causal_mask,
)


class Segment(NamedTuple):
    """Rows ``begin:end`` of a batch and the cached prefix they follow (None: none)."""

    begin: int
    end: int
    prefix: SharedPrefix | None

    @property
    def start(self) -> int:
        """Position of the rows' first token: the prefix length."""
        return self.prefix.length if self.prefix is not None else 0


SUPPORTED_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


@dataclass(frozen=True)
class FusedLayer:
    index: int
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor


def supports(model: Any) -> bool:
    config = model.config
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not layers or getattr(decoder, "rotary_emb", None) is None:
        return False
    if getattr(config, "hidden_act", None) != "silu":
        return False
    sliding = getattr(config, "sliding_window", None)
    if sliding is not None and getattr(config, "use_sliding_window", True):
        return False
    # The MLP runs without biases (Llama's mlp_bias would give all three projections one).
    return all(
        type(layer).__name__ in SUPPORTED_LAYERS
        and layer.mlp.gate_proj.bias is None
        and layer.mlp.down_proj.bias is None
        for layer in layers
    )


def _fuse(modules: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the linears' weights (and biases) and re-point each at its slice."""
    weight = torch.cat([m.weight.detach() for m in modules])
    has_bias = [m.bias is not None for m in modules]
    bias = torch.cat([m.bias.detach() for m in modules]) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("mixed biases")
    offset = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight.data = weight[offset : offset + rows]
        if bias is not None:
            m.bias.data = bias[offset : offset + rows]
        offset += rows
    return weight, bias


class FusedLlama:
    """``forward(ids, positions, segments)`` -> final-normed hidden states ``[B, T, H]``."""

    def __init__(self, model: Any) -> None:
        config = model.config
        decoder = model.get_decoder()
        self.decoder = decoder
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = float(config.rms_norm_eps)
        self.intermediate = config.intermediate_size
        self.layers: list[FusedLayer] = []
        with torch.no_grad():
            for i, layer in enumerate(decoder.layers):
                attn, mlp = layer.self_attn, layer.mlp
                qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
                gate_up, _ = _fuse([mlp.gate_proj, mlp.up_proj])
                self.layers.append(
                    FusedLayer(
                        index=i,
                        attn_norm=layer.input_layernorm.weight,
                        mlp_norm=layer.post_attention_layernorm.weight,
                        qkv=qkv,
                        qkv_bias=qkv_bias,
                        o=attn.o_proj.weight,
                        o_bias=attn.o_proj.bias,
                        gate_up=gate_up,
                        down=mlp.down_proj.weight,
                    )
                )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in three passes over ``x`` (F.rms_norm on CPU makes several more)."""
        if x.dtype != torch.float32:  # the module path normalises in fp32
            return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * weight
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        scale = norm.square_().div_(x.shape[-1]).add_(self.eps).rsqrt_()
        return torch.mul(x, weight).mul_(scale)

    @torch.inference_mode()  # out= matmuls refuse weights that require grad otherwise
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        segments: list[Segment],
        keep_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Hidden states of ``ids`` at ``positions`` (both ``[B, T]``).

        Rows ``begin:end`` of each segment follow its shared prefix (or nothing):
        a batch may mix the role, unsafe and reference conditions. ``keep_kv``
        receives each layer's keys and values ``[B, kv_heads, T, D]`` of ``ids``
        (to cache a prefix).
        """
        batch, length = ids.shape
        tokens = batch * length
        hidden = self.decoder.embed_tokens(ids).view(tokens, -1)
        cos, sin = self.decoder.rotary_emb(hidden, positions)
        # [B, T, 1, D]: broadcasts over heads in the [B, T, heads, D] layout.
        half = sin.shape[-1] // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        cos, signed_sin = cos[:, :, None, :], signed_sin[:, :, None, :]
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        masks = [
            None
            if prefix is None
            else prefix_causal_mask(prefix.length, length, hidden.dtype, hidden.device)
            for _, _, prefix in segments
        ]
        # Matmul outputs go to buffers reused by every layer: a fresh output of tens
        # of MB is a fresh mapping from the allocator, and its page faults cost more
        # than the matmul loses to them (a third at 3000 x 3072 on 2 cores).
        qkv_out = hidden.new_empty(tokens, (nq + 2 * nkv) * d)
        gate_up_out = hidden.new_empty(tokens, 2 * self.intermediate)
        proj_out = hidden.new_empty(tokens, hidden.shape[-1])
        for layer in self.layers:
            x = self._norm(hidden, layer.attn_norm)
            qkv = _linear(x, layer.qkv, layer.qkv_bias, qkv_out)
            qkv = qkv.view(batch, length, nq + 2 * nkv, d)
            qk = _rotary(qkv[:, :, : nq + nkv], cos, signed_sin)
            q, k = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2)
            v = qkv[:, :, nq + nkv :].transpose(1, 2)
            if keep_kv is not None:  # copies: qkv's buffer is reused by the next layer
                keep_kv.append((k.contiguous(), v.contiguous()))
            out = self._attend(layer.index, q, k, v, segments, masks)
            # out is [B, heads, T, D] over a [B, T, heads, D] buffer: this reshape is a view.
            out = out.transpose(1, 2).reshape(tokens, nq * d)
            hidden.add_(_linear(out, layer.o, layer.o_bias, proj_out))
            x = self._norm(hidden, layer.mlp_norm)
            gate_up = _linear(x, layer.gate_up, None, gate_up_out)
            act = F.silu(gate_up[:, : self.intermediate], inplace=True)
            act.mul_(gate_up[:, self.intermediate :])
            hidden.add_(_linear(act, layer.down, None, proj_out))
        return self._norm(hidden, self.decoder.norm.weight).view(batch, length, -1)

    @staticmethod
    def _attend(
        index: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segments: list[Segment],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        parts = []
        for (begin, end, prefix), mask in zip(segments, masks, strict=True):
            qs, ks, vs = q[begin:end], k[begin:end], v[begin:end]
            if prefix is None:
                parts.append(attend_causal(qs, ks, vs))
            else:
                pk, pv = prefix.layer(index)
                parts.append(attend_with_prefix(qs, ks, vs, pk, pv, mask=mask))
        if len(parts) == 1:
            return parts[0]
        # Along the batch, in the [B, T, heads, D] layout the caller reshapes as a view.
        return torch.cat([p.transpose(1, 2) for p in parts]).transpose(1, 2)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """``F.linear`` of 2-D ``x`` into ``out``."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, into one fresh contiguous buffer, in two passes.

    rotate_half(x) = [-x2, x1], so with ``signed_sin`` = [-sin1, sin2] each half
    of the output is x_i * cos_i plus the other half times its signed sine.
    """
    half = x.shape[-1] // 2
    out = torch.mul(x, cos, out=torch.empty_like(x, memory_format=torch.contiguous_format))
    out[..., :half].addcmul_(x[..., half:], signed_sin[..., :half])
    out[..., half:].addcmul_(x[..., :half], signed_sin[..., half:])
    return out
