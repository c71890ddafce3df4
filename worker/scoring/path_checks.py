"""Start-up checks of the scorer's forward paths against a plain forward of the whole sequence.

The scorer computes hidden states several ways: the fused Llama forward (after a cached
prefix or without one), shared-prefix attention, the module forward after a DynamicCache
holding the prefix, and the module forward of right-padded rows without a prefix. Each is
compared with the computation the scores are defined by: one unbatched, cache-free forward
of prefix + suffix from position 0. Comparing the paths with each other is not enough: under
transformers 5.19 the cache path silently dropped the prefix cache, the correct fast paths
"differed" from it and were switched off, and every condition scored like the empty-system
reference.

A fast path that disagrees is dropped with a warning; a path the scorer would still score
with that disagrees raises ``ScoringPathError`` when the scorer is built.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import transformers

from worker.encoding import Prefix
from worker.scoring import fused_llama
from worker.scoring.fused_llama import FusedLlama, Segment
from worker.scoring.prefix_attention import SharedPrefix
from worker.scoring.prefix_attention import register as register_prefix_attention

if TYPE_CHECKING:
    from worker.scoring.transformers_backend import KV, TransformersScorer

log = logging.getLogger(__name__)

FUSED_PREFIX = "fused forward after a cached prefix"
FUSED_PLAIN = "fused forward without a prefix"
PREFIX_ATTENTION = "shared-prefix attention"
CACHE = "module forward after a DynamicCache prefix"
PLAIN = "batched module forward without a prefix"

# The prefix is built in two steps, as the unsafe prompt extends the cached role prompt, so
# the extension of a cached prefix is checked too. Rows of unequal length: the shorter one
# is right-padded, as in a scoring batch.
PREFIX_LEN = 12
FIRST_STEP = 8
SUFFIX_LENS = (5, 3)

# In bf16 the model's own forward moves by 1-2% between batch shapes (SmolLM2-135M,
# Qwen2.5-0.5B), and the paths land up to 3 times that far from the unbatched forward: a
# path may differ by this many times that noise, where it exceeds the dtype's tolerance. A
# path that drops or misplaces the prefix is off by the size of the output itself (a
# relative error near 1), far beyond either.
NOISE_FACTOR = 5


def check_ids(vocab_size: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(prefix, suffixes): consecutive ids from 1000 (or a quarter into a smaller vocabulary).

    Away from the low ids: special, control and byte tokens, often untrained, make a bf16
    forward unstable (SmolLM2's ids 3..19: 4% apart between a batch of one row and of two).
    """
    first = min(1000, vocab_size // 4)
    prefix = tuple(range(first, first + PREFIX_LEN))
    suffixes, start = [], first + PREFIX_LEN
    for n in SUFFIX_LENS:
        suffixes.append(tuple(range(start, start + n)))
        start += n
    return prefix, tuple(suffixes)


class ScoringPathError(RuntimeError):
    """No path the scorer would score with reproduces the model's plain forward."""


@dataclass(frozen=True)
class Check:
    """How far one path's outputs lie from the plain forward's."""

    path: str
    error: float
    """max |path - plain forward| / max |plain forward|; inf where the path raised."""
    failure: str | None = None

    def ok(self, tolerance: float) -> bool:
        return self.error <= tolerance

    def describe(self) -> str:
        return (
            f"{self.path} raised {self.failure}"
            if self.failure
            else f"{self.path} off by {self.error:.2g}"
        )


@dataclass(frozen=True)
class Paths:
    """Which paths reproduce a plain forward of one loaded model, from the start-up checks."""

    direct_projection: bool
    shared_prefix_attention: bool
    fused: FusedLlama | None
    signature: tuple[int, ...]
    checks: tuple[Check, ...]
    tolerance: float

    def require(self, model: Any, *, reuse_prefix: bool) -> None:
        """Raise ``ScoringPathError`` if a path a scorer with ``reuse_prefix`` uses disagrees.

        Kept apart from the checks: their results are cached per model, while what a
        scorer needs depends on its own ``reuse_prefix``.
        """
        if self.fused is not None:
            return  # it scores every row and builds the prefix keys, and passed its checks
        needed = {PLAIN, CACHE} if reuse_prefix else {PLAIN}
        if all(c.ok(self.tolerance) for c in self.checks if c.path in needed):
            return
        wrong = "; ".join(c.describe() for c in self.checks if not c.ok(self.tolerance))
        plain_ok = all(c.ok(self.tolerance) for c in self.checks if c.path == PLAIN)
        advice = (
            "score with reuse_prefix=False (the forward without a prefix agrees) or install "
            if reuse_prefix and plain_ok
            else "install "
        )
        raise ScoringPathError(
            f"scoring {type(model).__name__} under transformers {transformers.__version__}: "
            f"no usable path reproduces a plain forward of the whole sequence ({wrong}; "
            f"relative to its largest output, tolerance {self.tolerance:g}). "
            f"Scores would be wrong: {advice}{_pinned_transformers()}."
        )


def parameter_signature(model: Any) -> tuple[int, ...]:
    """Identifies the parameter tensors the checks ran on: moved or re-cast weights differ."""
    return tuple(p.data_ptr() for p in model.parameters())


@torch.inference_mode()
def check_paths(scorer: TransformersScorer) -> Paths:
    """Run every check on a scorer still on the module path (no fused forward, no
    shared-prefix attention): once per loaded model, since each runs several forwards."""
    direct = _projection_matches_model(scorer)
    # The module the scorer would run: decoder hidden states, or the model's logits.
    module = scorer.decoder if direct else scorer.model
    case = _Case(scorer, module)
    tolerance = max(
        _tolerance(next(scorer.decoder.parameters()).dtype), NOISE_FACTOR * case.noise()
    )
    checks = [
        case.check_suffix(CACHE, lambda: scorer._run(module, *case.suffix_batch())),
        case.check_whole(PLAIN, lambda: scorer._run(module, *case.whole_batch())),
    ]
    cpu = scorer.device.type == "cpu"
    spa = cpu and _check_prefix_attention(scorer, case, module, checks, tolerance)
    fused = None
    if cpu and direct and fused_llama.supports(scorer.model):
        fused = _check_fused(scorer, case, checks, tolerance)
    if fused is not None:
        for c in checks:
            if c.path in (CACHE, PLAIN) and not c.ok(tolerance):
                log.warning("%s; unused while the fused forward scores", c.describe())
    # After fusing: the model's projections now point into the fused weights.
    return Paths(direct, spa, fused, parameter_signature(scorer.model), tuple(checks), tolerance)


def _check_prefix_attention(
    scorer: TransformersScorer, case: _Case, module: Any, checks: list[Check], tolerance: float
) -> bool:
    """Shared-prefix attention relies on the model routing attention through transformers'
    attention interface; a model that does not (or adds sliding windows, soft-capping)
    keeps the cache path."""
    register_prefix_attention()
    scorer.shared_prefix_attention = True
    try:
        check = case.check_suffix(
            PREFIX_ATTENTION, lambda: scorer._run(module, *case.suffix_batch())
        )
    finally:
        scorer.shared_prefix_attention = False
    checks.append(check)
    if not check.ok(tolerance):
        log.warning("%s; using the cache path", check.describe())
    return check.ok(tolerance)


def _check_fused(
    scorer: TransformersScorer, case: _Case, checks: list[Check], tolerance: float
) -> FusedLlama | None:
    """The lean Llama forward, if it reproduces a plain forward with and without a prefix."""
    try:
        fused = FusedLlama(scorer.model)
    except Exception as exc:  # a layer this forward does not know
        log.warning("fused forward unavailable (%s); using the module path", exc)
        return None

    def after_prefix() -> torch.Tensor:
        ids, positions, kv, start = case.suffix_batch()
        segments = [Segment(0, len(ids), SharedPrefix(kv, start))]
        return fused.forward(ids, positions.expand(len(ids), -1), segments)

    def whole() -> torch.Tensor:
        ids, positions, _, _ = case.whole_batch()
        return fused.forward(ids, positions.expand(len(ids), -1), [Segment(0, len(ids), None)])

    scorer.fused = fused  # its own prefix keys, as the scorer builds them with it
    try:
        own = [case.check_suffix(FUSED_PREFIX, after_prefix), case.check_whole(FUSED_PLAIN, whole)]
    finally:
        scorer.fused = None
    checks += own
    bad = [c.describe() for c in own if not c.ok(tolerance)]
    if bad:
        log.warning("%s; using the module path", "; ".join(bad))
        return None
    return fused


class _Case:
    """Two sequences, a shared prefix and a suffix each, and the plain forward of each alone."""

    def __init__(self, scorer: TransformersScorer, module: Any) -> None:
        self.scorer = scorer
        self.module = module
        device = scorer.device
        vocab_size = scorer.model.get_input_embeddings().weight.shape[0]
        self.prefix, self.suffixes = check_ids(vocab_size)
        self.full = [self.prefix + s for s in self.suffixes]
        self.reference = [
            self._output(module(input_ids=torch.tensor([ids], device=device), use_cache=False))[0]
            for ids in self.full
        ]
        pad = scorer.model.config.pad_token_id
        self.pad = 0 if pad is None else int(pad)

    def noise(self) -> float:
        """How far the plain forward moves with the batch shape alone: the first sequence
        twice in one batch (no padding, no cache, nothing a path could get wrong) against
        itself alone."""
        twice = torch.tensor([self.full[0]] * 2, device=self.scorer.device)
        got = self._output(self.module(input_ids=twice, use_cache=False))[0]
        return _relative_error(got, self.reference[0])

    def _output(self, out: Any) -> torch.Tensor:
        return out.last_hidden_state if self.module is self.scorer.decoder else out.logits

    def _padded(self, rows: list[tuple[int, ...]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor(
            [list(r) + [self.pad] * (width - len(r)) for r in rows], device=self.scorer.device
        )

    def suffix_batch(self) -> tuple[torch.Tensor, torch.Tensor, KV, int]:
        """(ids, positions, prefix kv, prefix length): the suffixes after the cached prefix.

        The prefix keys are built afresh by the scorer's current path each time."""
        start = len(self.prefix)
        ids = self._padded(list(self.suffixes))
        positions = torch.arange(start, start + ids.shape[1], device=self.scorer.device)[None]
        return ids, positions, self._prefix_kv(), start

    def whole_batch(self) -> tuple[torch.Tensor, torch.Tensor, None, int]:
        """(ids, positions, None, 0): the whole sequences, no prefix."""
        ids = self._padded(self.full)
        return ids, torch.arange(ids.shape[1], device=self.scorer.device)[None], None, 0

    def _prefix_kv(self) -> KV:
        scorer = self.scorer
        first = Prefix(key="\0self-check-first", token_ids=self.prefix[:FIRST_STEP])
        second = Prefix(key="\0self-check", token_ids=self.prefix)
        try:
            scorer._kv_for(first)
            return scorer._kv_for(second)  # extends the first
        finally:
            scorer._prefix_kv.pop(first.key, None)
            scorer._prefix_kv.pop(second.key, None)

    def check_suffix(self, path: str, run: Callable[[], Any]) -> Check:
        """Compare the suffixes' outputs of ``run()`` with the plain forward's."""
        start = len(self.prefix)
        return self._check(path, run, [(start, len(s)) for s in self.suffixes])

    def check_whole(self, path: str, run: Callable[[], Any]) -> Check:
        """Compare the whole sequences' outputs of ``run()`` with the plain forward's."""
        return self._check(path, run, [(0, len(ids)) for ids in self.full])

    def _check(self, path: str, run: Callable[[], Any], rows: list[tuple[int, int]]) -> Check:
        """``rows``: where each row of ``run()`` starts in its sequence, and how many of its
        positions are real (the rest is padding)."""
        want = torch.cat([ref[s : s + n] for ref, (s, n) in zip(self.reference, rows, strict=True)])
        try:
            out = run()
            got = out if isinstance(out, torch.Tensor) else self._output(out)
            got = torch.cat([got[r, :n] for r, (_, n) in enumerate(rows)])
            return Check(path, _relative_error(got, want))
        except Exception as exc:  # an architecture or a release this path does not support
            return Check(path, math.inf, f"{type(exc).__name__}: {exc}")


def _projection_matches_model(scorer: TransformersScorer) -> bool:
    """Check once that lm_head(decoder(x)) is what the model's forward returns.

    Some architectures scale or post-process logits in their forward; those
    take the slower full-forward path rather than silently drifting.
    """
    ids = torch.arange(3, 11, device=scorer.device)[None]
    full = scorer.model(input_ids=ids).logits.float()
    direct = scorer._project(scorer.decoder(input_ids=ids).last_hidden_state)
    ok = bool(torch.allclose(full, direct, rtol=1e-3, atol=1e-3))
    if not ok:
        log.warning("output projection differs from the model's forward; using full logits")
    return ok


def _pinned_transformers() -> str:
    try:
        requirements = importlib.metadata.requires("sarft") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    pins = [r for r in requirements if re.match(r"transformers\s*[<>=!~]", r)]
    return pins[0] if pins else "the transformers release pinned in pyproject.toml"


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())
