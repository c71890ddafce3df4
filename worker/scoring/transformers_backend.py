"""The reference scorer on transformers (CPU or GPU).

Three things make it fast without changing a single log-probability:
- each condition's prefix (system prompt and template framing) is run once and
  its KV cache is reused for every sequence that starts with it; the role and
  unsafe prefixes share their common text, computed once;
- sequences are bucketed by the length that still needs computing, so batches
  carry little padding (padding goes on the right, where causal attention
  keeps it from touching real tokens);
- the vocabulary projection runs only at positions that predict a response token,
  a cache-sized slice of the vocabulary at a time (``output_projection``).

On CPU, Llama-family models run through ``fused_llama`` (wider matmuls, fewer
temporaries). Every path is checked at start-up against a plain forward of the whole
sequence (``path_checks``): a fast path that disagrees is dropped, and a scorer left with no
path that agrees raises ``ScoringPathError`` rather than score with wrong numbers.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any

import torch
from transformers import DynamicCache

from worker.encoding import EncodedSequence, Prefix, _common_prefix_len
from worker.scoring.base import ResponseLogprob
from worker.scoring.fused_llama import FusedLlama, Segment
from worker.scoring.output_projection import (
    _shifted_logprobs as _shifted_logprobs,  # re-exported: the tests check it from here
)
from worker.scoring.output_projection import apply_softcap, label_logprobs
from worker.scoring.path_checks import Paths, check_paths, parameter_signature
from worker.scoring.prefix_attention import (
    ATTENTION_NAME,
    SharedPrefix,
    attention_implementation,
)

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]


# Keyed by the loaded model; a model whose parameters were replaced since (moved to
# another dtype or device, say) has another signature and is checked again.
_PATHS: weakref.WeakKeyDictionary[Any, Paths] = weakref.WeakKeyDictionary()


def _needed_len(seq: EncodedSequence) -> int:
    """Tokens that must be run: the last response token is only a label, never an input."""
    return max(end for _, end in seq.response_spans) - 1


class TransformersScorer:
    name = "transformers"

    def __init__(
        self,
        model: Any,
        *,
        batch_size: int = 16,
        max_batch_tokens: int = 16384,
        reuse_prefix: bool = True,
        fp32_head: bool = False,
    ) -> None:
        """``fp32_head``: with a bf16 (or fp16) model, project onto the vocabulary and take the
        log-softmax in fp32 from an fp32 copy of the output embedding, while the decoder blocks
        run in the model's dtype. Off by default: on 96 RoleBench rows it kept no more fp32
        flags than the bf16 head (95.8% with SmolLM2-135M, 96.9% against 97.9% with
        Qwen2.5-Coder-0.5B) and cost 25-35% of bf16's speed; the float32 check of the samples
        near the boundary is what keeps the flags (``ScoreConfig.check_band``).

        Raises ``path_checks.ScoringPathError`` where no path this scorer would use
        reproduces a plain forward of the model (a transformers release it was not
        written for)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.reuse_prefix = reuse_prefix
        self.device = next(model.parameters()).device
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._prefix_kv: dict[str, tuple[tuple[int, ...], KV]] = {}
        self.shared_prefix_attention = False
        self.fused: FusedLlama | None = None  # the checks below run on the module path
        paths = _PATHS.get(model)
        if paths is None or paths.signature != parameter_signature(model):
            paths = check_paths(self)
            _PATHS[model] = paths
        paths.require(model, reuse_prefix=reuse_prefix)
        self.direct_projection = paths.direct_projection
        self.shared_prefix_attention = reuse_prefix and paths.shared_prefix_attention
        self.fused = paths.fused
        # Copied after the checks: fusing may re-point the model's weights.
        weight, bias = self.lm_head.weight, self.lm_head.bias
        self.head_weight, self.head_bias = weight, bias
        if fp32_head and weight.dtype != torch.float32:
            self.head_weight = weight.detach().float()
            self.head_bias = None if bias is None else bias.detach().float()

    # -- public -----------------------------------------------------------
    @torch.inference_mode()
    def score(
        self,
        sequences: Sequence[EncodedSequence],
        on_scored: Callable[[int], None] | None = None,
    ) -> list[ResponseLogprob]:
        results: list[ResponseLogprob | None] = [None] * len(sequences)
        kvs: dict[str, KV] = {}
        shared = [0] * len(sequences)
        keys: list[str | None] = [None] * len(sequences)
        for i, seq in enumerate(sequences):
            if self.reuse_prefix and seq.shared_len > 0:
                if seq.prefix.key not in kvs:
                    kvs[seq.prefix.key] = self._kv_for(seq.prefix)
                keys[i], shared[i] = seq.prefix.key, seq.shared_len
        # The fused forward takes rows of several prefixes in one batch; the module
        # path takes one prefix per batch.
        groups: dict[str | None, list[int]] = defaultdict(list)
        for i in range(len(sequences)):
            groups[None if self.fused is not None else keys[i]].append(i)
        for members in groups.values():
            # Bucket by the work left per sequence: similar lengths batch together.
            members.sort(key=lambda i: _needed_len(sequences[i]) - shared[i])
            for batch in self._batches(members, sequences, shared):
                batch.sort(key=lambda i: keys[i] or "")  # each prefix's rows together
                segments = []
                for key, rows in groupby(range(len(batch)), key=lambda r: keys[batch[r]]):
                    rows_list = list(rows)
                    start = min(shared[batch[r]] for r in rows_list)
                    prefix = SharedPrefix(kvs[key], start) if key is not None else None
                    segments.append(Segment(rows_list[0], rows_list[-1] + 1, prefix))
                sums = self._score_batch([sequences[i] for i in batch], segments)
                for i, s in zip(batch, sums, strict=True):
                    results[i] = ResponseLogprob(sum=s, count=sequences[i].num_response_tokens)
                if on_scored is not None:
                    on_scored(len(batch))
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # -- batching -----------------------------------------------------------
    def _batches(
        self, order: list[int], sequences: Sequence[EncodedSequence], shared: list[int]
    ) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = _needed_len(sequences[i]) - shared[i]  # order is ascending
            if current and (
                len(current) >= self.batch_size
                or longest * (len(current) + 1) > self.max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    # -- prefix cache --------------------------------------------------------
    def _kv_for(self, prefix: Prefix) -> KV:
        cached = self._prefix_kv.get(prefix.key)
        if cached is not None:
            return cached[1]
        # Extend the cached prefix that shares most tokens with this one: the
        # unsafe prompt starts with the role prompt, so only its tail is computed.
        best_len, best_kv = 0, None
        for ids, kv in self._prefix_kv.values():
            n = _common_prefix_len(ids, prefix.token_ids)
            if n > best_len:
                best_len, best_kv = n, kv
        total = len(prefix.token_ids)
        if best_kv is not None and best_len == total:
            # Wholly inside a cached prefix (both cut by max_prompt_tokens, say).
            kv = [(k[:, :, :total], v[:, :, :total]) for k, v in best_kv]
        else:
            tail = torch.tensor([prefix.token_ids[best_len:]], dtype=torch.long, device=self.device)
            kv = self._extend_kv(tail, best_kv, best_len)
        self._prefix_kv[prefix.key] = (prefix.token_ids, kv)
        log.debug("prefix %s: %d tokens, %d reused", prefix.key, total, best_len)
        return kv

    def _extend_kv(self, tail: torch.Tensor, kv: KV | None, length: int) -> KV:
        """Keys and values of the first ``length`` tokens of ``kv`` followed by ``tail``."""
        positions = torch.arange(length, length + tail.shape[1], device=self.device)[None]
        if self.fused is None:
            past = (
                self._cache_from(kv, length, 1)
                if kv is not None
                else DynamicCache(config=self.model.config)
            )
            out = self.decoder(input_ids=tail, cache=past, position_ids=positions, use_cache=True)
            return [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        new: KV = []
        shared = SharedPrefix(kv, length) if kv is not None else None
        self.fused.forward(tail, positions, [Segment(0, 1, shared)], keep_kv=new)
        if kv is None:
            return new
        return [
            (torch.cat([k0[:, :, :length], k], 2), torch.cat([v0[:, :, :length], v], 2))
            for (k0, v0), (k, v) in zip(kv, new, strict=True)
        ]

    def _cache_from(self, kv: KV, length: int, batch: int) -> DynamicCache:
        # expand() is a view: the cached tensors are never written, since the
        # cache concatenates new keys into fresh tensors.
        layers = [
            (k[:, :, :length].expand(batch, -1, -1, -1), v[:, :, :length].expand(batch, -1, -1, -1))
            for k, v in kv
        ]
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    # -- the forward -----------------------------------------------------------
    def _score_batch(self, batch: list[EncodedSequence], segments: list[Segment]) -> list[float]:
        """Sum of response log-probs per sequence; each segment's rows follow its prefix."""
        starts = [0] * len(batch)
        for seg in segments:
            starts[seg.begin : seg.end] = [seg.start] * (seg.end - seg.begin)
        width = max(_needed_len(s) - st for s, st in zip(batch, starts, strict=True))
        pad = self.model.config.pad_token_id
        pad = 0 if pad is None else int(pad)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        labels: list[int] = []
        for r, (seq, start) in enumerate(zip(batch, starts, strict=True)):
            suffix = seq.token_ids[start : _needed_len(seq)]
            ids[r, : len(suffix)] = torch.tensor(suffix)
            for s, e in seq.response_spans:
                # Position p - 1 predicts token p.
                rows += [r] * (e - s)
                cols += range(s - 1 - start, e - 1 - start)
                labels += seq.token_ids[s:e]
        ids = ids.to(self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(
            width, device=self.device
        )
        row_t = torch.tensor(rows, device=self.device)
        col_t = torch.tensor(cols, device=self.device)
        label_t = torch.tensor(labels, device=self.device)
        if self.fused is not None:
            hidden = self.fused.forward(ids, positions, segments)
            token_lp = self._label_logprobs(hidden[row_t, col_t], label_t)
        else:
            (seg,) = segments  # the module path runs one prefix per batch
            prefix = seg.prefix.kv if seg.prefix is not None else None
            positions = positions[:1]
            if self.direct_projection:
                hidden = self._run(self.decoder, ids, positions, prefix, seg.start)
                token_lp = self._label_logprobs(hidden.last_hidden_state[row_t, col_t], label_t)
            else:
                out = self._run(self.model, ids, positions, prefix, seg.start)
                logits = out.logits[row_t, col_t].float()
                token_lp = logits.gather(1, label_t[:, None]).squeeze(1) - torch.logsumexp(
                    logits, -1
                )
        sums = torch.zeros(len(batch), dtype=torch.float64, device=self.device)
        sums.index_add_(0, row_t, token_lp.double())
        return sums.tolist()

    def _label_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label) at each row of ``hidden``; see ``output_projection.label_logprobs``."""
        if hidden.dtype != self.head_weight.dtype:
            hidden = hidden.to(self.head_weight.dtype)  # bf16 hidden states, fp32 head
        return label_logprobs(hidden, labels, self.head_weight, self.head_bias, self.softcap)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return apply_softcap(self.lm_head(hidden).float(), self.softcap)

    def _run(
        self, module: Any, ids: torch.Tensor, positions: torch.Tensor, kv: KV | None, start: int
    ) -> Any:
        """Forward ``ids`` (at ``positions``) after the first ``start`` tokens of ``kv``."""
        if kv is not None and self.shared_prefix_attention:
            with attention_implementation(self.model, ATTENTION_NAME):
                return module(
                    input_ids=ids,
                    position_ids=positions,
                    use_cache=False,
                    sarft_prefix=SharedPrefix(kv, start),
                )
        past = self._cache_from(kv, start, ids.shape[0]) if kv is not None else None
        return module(input_ids=ids, cache=past, position_ids=positions, use_cache=past is not None)
