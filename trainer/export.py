"""A LoRA run as a standalone model: the base model with the adapter merged into its weights.

The result is a plain Hugging Face checkpoint (the base's config.json and architecture,
safetensors weights, tokenizer, generation config, no adapter files), archived as
:data:`~trainer.artifacts.MERGED_MODEL_ARCHIVE`. It loads with ``from_pretrained`` or in vLLM
with no PEFT installed, at the price of a full copy of the weights, which is why a run
publishes only the adapter and the merge is made on request.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.artifacts import MERGED_MODEL_ARCHIVE, write_archive
from worker.model_loader import DTYPES, load_model

MERGED_DIR = "merged_model"  # the archive's top directory
# One fixed name, not a fresh temporary directory: an attempt killed mid-write leaves a copy
# of the weights behind, which the next attempt removes. The caller runs one export per
# ``out_dir`` at a time.
WORK_DIR = ".merged_model.work"
ADAPTER_CONFIG = "adapter_config.json"


def merge_adapter(adapter: Path, out_dir: Path, model: str | None = None) -> Path:
    """Merge ``adapter`` (a PEFT directory, or a run's adapter.tar.gz) into the base ``model``
    (an HF id or directory, a packaged model's name; None: the bundled model) and write
    ``out_dir/merged_model.tar.gz``; returns its path."""
    with _adapter_dir(Path(adapter)) as adapter_dir:
        # The adapter is read before the model loads: a bad archive fails in a second.
        loaded = load_model(model)
        return merge_loaded(
            loaded.model,
            loaded.tokenizer,
            adapter_dir,
            Path(out_dir),
            dtype=checkpoint_dtype(loaded.path),
        )


def merge_loaded(
    model: Any,
    tokenizer: Any,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Merge the PEFT adapter in ``adapter_dir`` into ``model`` (changed in place), save it in
    ``dtype`` (None: as loaded) with ``tokenizer``, and archive it as
    ``out_dir/merged_model.tar.gz``; returns its path. Nothing but the archive is left behind,
    even on failure."""
    from peft import PeftModel

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / MERGED_MODEL_ARCHIVE
    discard_partial(out_dir)
    merged_dir = out_dir / WORK_DIR / MERGED_DIR
    try:
        # Merged in the precision the model was loaded in (the trainer's fp32), then cast to
        # the checkpoint's dtype, so that each merged weight is rounded once.
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload(safe_merge=True)
        if dtype is not None:
            merged.to(dtype)
        # transformers 5 writes safetensors only (and the generation config the base had).
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        write_archive(merged_dir, target)
    finally:
        discard_partial(out_dir)
    return target


def discard_partial(out_dir: Path) -> None:
    """Remove what an unfinished export wrote into ``out_dir``; a finished archive stays."""
    shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)
    (out_dir / (MERGED_MODEL_ARCHIVE + ".part")).unlink(missing_ok=True)


def checkpoint_dtype(path: str) -> torch.dtype | None:
    """The dtype a checkpoint's config.json declares (None when it declares none we know)."""
    from transformers import AutoConfig

    declared = AutoConfig.from_pretrained(path).dtype
    if isinstance(declared, torch.dtype):
        return declared
    return DTYPES.get(str(declared)) if declared is not None else None


@contextmanager
def _adapter_dir(adapter: Path) -> Iterator[Path]:
    """The PEFT directory itself, or the one inside an archive (extracted for the block)."""
    if adapter.is_dir():
        _check_adapter(adapter)
        yield adapter
        return
    with tempfile.TemporaryDirectory(prefix="sarft-adapter-") as tmp:
        with tarfile.open(adapter) as tar:
            tar.extractall(tmp, filter="data")
        found = sorted(p.parent for p in Path(tmp).rglob(ADAPTER_CONFIG))
        if len(found) != 1:
            raise ValueError(f"{adapter} holds {len(found)} PEFT adapters, not 1")
        _check_adapter(found[0])
        yield found[0]


def _check_adapter(path: Path) -> None:
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path} is not a PEFT adapter: it has no {ADAPTER_CONFIG}")
