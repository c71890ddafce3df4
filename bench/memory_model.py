"""The memory model of one training step: peak bytes as a function of batch, tokens and vocabulary.

    python bench/memory_model.py            # the extrapolation to Llama-3-8B (micro-batch 2 x 640)

bench/training.py prints this model's prediction beside each measured peak. What a step holds
at its peak, above the loaded weights (B rows per micro-batch, T tokens each, of which R predict
response tokens; F of the B rows flagged; L layers, hidden size H, MLP width M, key/value width
K, vocabulary V; ``a`` bytes per activation, 4 in float32 and 2 under bfloat16 autocast):

* training state: LoRA, its parameters' gradient and AdamW's two moments (12 bytes each);
  full fine-tuning, the same for every parameter, plus the frozen reference copy (weight bytes).
* activations saved for the backward: ``B T L (7 H + 2 K + 4 M) a`` (per layer: the two
  RMSNorm inputs and outputs, q, attention output, o_proj input and residual, k and v, and the
  MLP's gate, up, activation and product), plus the attention probabilities of the math
  kernel, ``B heads T^2 L 4``.
  With gradient checkpointing, ``B T L H a`` (each layer's input) plus one layer's share of
  the above, recomputed in the backward.
* the loss head, unfused (trainer/loss.py): float32 [positions, V] tensors. The policy's logits
  over its kept positions (every position of a flagged micro-batch, else from the first response
  position), the CE's picked rows and their log-softmax, and for the KL the policy's and the
  reference's log-softmax at the F T KL positions, the reference's logits and the elementwise
  KL; the backward adds gradients of the same sizes. Counted as
  ``4 V (2 B P + R + 6 F T)`` with P the kept positions per row.
* the loss head, fused (trainer/fused_loss.py): about five chunk buffers
  (``5 x rows x V x 4`` bytes, rows from ``chunk_rows_for(V)``), the gathered hidden states
  and their gradient, and the reference's final hidden states for the F flagged rows, ``F T H a``.

It is a model, not an accounting of every buffer: allocator slack, the attention mask and the
optimizer's temporaries are left out, so it is checked against bench/training.py's measured
peaks, and its error is printed there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.fused_loss import chunk_rows_for

GB = 1e9


@dataclass(frozen=True)
class Shape:
    """A decoder's sizes, as in its transformers config."""

    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_width: int  # num_key_value_heads x head_dim
    vocab: int
    params: float

    @classmethod
    def of(cls, model: object) -> Shape:
        config = model.config  # type: ignore[attr-defined]
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            mlp=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_width=config.num_key_value_heads * head_dim,
            vocab=config.vocab_size,
            params=float(sum(p.numel() for p in model.parameters())),  # type: ignore[attr-defined]
        )


LLAMA3_8B = Shape(
    layers=32, hidden=4096, mlp=14336, heads=32, kv_width=1024, vocab=128256, params=8.03e9
)


@dataclass(frozen=True)
class MicroBatch:
    rows: int  # B
    tokens: int  # T per row (padded width)
    response: int  # R: positions predicting response tokens, over the micro-batch
    flagged: int  # F rows with the KL term
    kept: int  # P: positions per row whose logits the unfused head computes


def state_bytes(
    shape: Shape,
    trainable: float,
    full: bool,
    weight_bytes: int = 4,
    reference_cache: float | None = None,
    optimizer_in_backward: bool = False,
) -> float:
    """Gradients and AdamW moments of the trainable parameters; the reference copy if full.
    With ``reference_cache`` (its bytes, :mod:`trainer.reference_cache`) the cache replaces the
    reference copy but for its head, which full fine-tuning keeps. With
    ``optimizer_in_backward`` (:class:`trainer.optimizers.AdamWInBackward`) one gradient at a
    time: the largest, the head's in full fine-tuning (the adapters' are negligible)."""
    if optimizer_in_backward:
        state = trainable * 8.0 + (shape.vocab * shape.hidden * 4.0 if full else 0.0)
    else:
        state = trainable * 12.0
    if reference_cache is None:
        return state + (shape.params * weight_bytes if full else 0.0)
    return state + (shape.vocab * shape.hidden * weight_bytes if full else 0.0) + reference_cache


def activation_bytes(
    shape: Shape,
    mb: MicroBatch,
    act_bytes: int,
    attention_probs: bool = True,
    checkpointing: bool = False,
) -> float:
    """``attention_probs``: the math attention kernel's saved probabilities (CPU with a padding
    mask); flash and memory-efficient kernels on a GPU save none. With ``checkpointing``
    (``TrainConfig.gradient_checkpointing``) each layer keeps only its input, and the backward
    holds one layer's recomputed activations at a time."""
    layer_token = 7 * shape.hidden + 2 * shape.kv_width + 4 * shape.mlp
    layer_attention = mb.rows * shape.heads * mb.tokens**2 * 4 if attention_probs else 0
    tokens = mb.rows * mb.tokens
    if checkpointing:
        inputs = tokens * shape.layers * shape.hidden * act_bytes
        return inputs + tokens * layer_token * act_bytes + layer_attention
    return (tokens * layer_token * act_bytes + layer_attention) * shape.layers


def head_bytes(shape: Shape, mb: MicroBatch, fused: bool, act_bytes: int) -> float:
    if fused:
        positions = mb.response + mb.flagged * mb.tokens
        gathered = 3 * positions * shape.hidden * 4
        ref_hidden = mb.flagged * mb.tokens * shape.hidden * act_bytes
        chunks = 5 * min(chunk_rows_for(shape.vocab), positions) * shape.vocab * 4
        return chunks + gathered + ref_hidden
    return 4.0 * shape.vocab * (2 * mb.rows * mb.kept + mb.response + 6 * mb.flagged * mb.tokens)


def step_peak_bytes(
    shape: Shape,
    micro_batches: list[MicroBatch],
    trainable: float,
    full: bool,
    fused: bool,
    act_bytes: int = 4,
    weight_bytes: int = 4,
    reference_cache: float | None = None,
    checkpointing: bool = False,
    optimizer_in_backward: bool = False,
) -> float:
    """The largest micro-batch's activations and head on top of the training state (see
    :func:`state_bytes` for ``reference_cache`` and ``optimizer_in_backward``,
    :func:`activation_bytes` for ``checkpointing``)."""
    transient = max(
        activation_bytes(shape, mb, act_bytes, checkpointing=checkpointing)
        + head_bytes(shape, mb, fused, act_bytes)
        for mb in micro_batches
    )
    state = state_bytes(
        shape, trainable, full, weight_bytes, reference_cache, optimizer_in_backward
    )
    return state + transient


def _llama3_8b_bytes(
    rows: int, fused: bool, zero2: bool, checkpointing: bool = False
) -> tuple[float, float, float]:
    """(activations, loss head, total per GPU) for ``rows`` flagged rows of 640 tokens."""
    shape = LLAMA3_8B
    mb = MicroBatch(rows=rows, tokens=640, response=rows * 128, flagged=rows, kept=640)
    weights = shape.params * 2
    act = activation_bytes(shape, mb, 2, attention_probs=False, checkpointing=checkpointing)
    head = head_bytes(shape, mb, fused, 2)
    if zero2:
        # bf16 weights and the frozen bf16 reference replicated; fp32 master weights, AdamW
        # moments and bf16 gradients sharded over the 4 processes.
        return act, head, 2 * weights + shape.params * (4 + 8 + 2) / 4 + act + head
    lora = 2 * 32 * (4096 + 4096) * 32 + 2 * 32 * (4096 + 1024) * 32  # r=32 on q_proj, v_proj
    return act, head, weights + state_bytes(shape, lora, False) + act + head


def llama3_8b_table(gpu_bytes: float = 80e9) -> list[list[str]]:
    """Llama-3-8B at micro-batch 2 x 640 tokens, every row flagged, KL at every position,
    bf16 weights and activations, a flash attention kernel: LoRA on one 80 GB GPU, and full
    fine-tuning with ZeRO-2 on four; and the largest micro-batch that fits each."""
    rows = []
    for zero2 in (False, True):
        for fused, checkpointing in ((False, False), (True, False), (True, True)):
            act, head, total = _llama3_8b_bytes(2, fused, zero2, checkpointing)
            largest = 0
            while _llama3_8b_bytes(largest + 1, fused, zero2, checkpointing)[2] <= gpu_bytes:
                largest += 1
            loss = "fused" if fused else "unfused"
            rows.append(
                [
                    "full, ZeRO-2 on 4 GPUs" if zero2 else "LoRA, 1 GPU",
                    loss + (" + checkpointing" if checkpointing else ""),
                    f"{act / GB:.1f}",
                    f"{head / GB:.2f}",
                    f"{total / GB:.1f}",
                    str(largest),
                ]
            )
    return rows


def main() -> None:
    from bench.common import print_table

    print("Llama-3-8B, micro-batch 2 x 640 tokens (both flagged, KL at every position), bf16:")
    headers = ["setup", "loss", "activations GB", "loss head GB", "per GPU GB"]
    print_table([*headers, "largest micro-batch in 80 GB"], llama3_8b_table())


if __name__ == "__main__":
    main()
