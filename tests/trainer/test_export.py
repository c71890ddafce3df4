"""Merged-model export on the tiny random Llama: the merged checkpoint is a plain HF model that
computes what base + adapter computes, in the base's dtype, and a failure leaves nothing."""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.artifacts import ADAPTER_ARCHIVE, MERGED_MODEL_ARCHIVE, write_archive
from trainer.export import MERGED_DIR, merge_adapter, merge_loaded

# The merged model computes x @ (W + s B A), base + adapter x @ W + s (x @ A) @ B: the same
# sums rounded in another order. On the tiny model (logits up to about 8) they differ by about
# 1e-5, 10 fp32 ulps; a bf16 round trip or a wrong scale would differ by 1e-2 or more.
FP32_TOLERANCE = 1e-5  # of the largest logit's magnitude
PROBE = "Where is your ship, captain? Beneath the waves."


def _save_base(model: Any, tokenizer: Any, path: Path, dtype: torch.dtype) -> Path:
    copy.deepcopy(model).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return _save_base(tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("base"), torch.float32)


@pytest.fixture(scope="module")
def adapter_archive(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) B, archived as a run publishes it."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("run")
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,  # B = 0 would make the merge a no-op and the test vacuous
    )  # fmt: skip
    torch.manual_seed(7)
    peft_model = get_peft_model(copy.deepcopy(tiny_model), config)
    peft_model.save_pretrained(str(root / "adapter"), save_embedding_layers=False)
    write_archive(root / "adapter", root / ADAPTER_ARCHIVE)
    return root / ADAPTER_ARCHIVE


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


def _unpack(archive: Path, into: Path) -> tuple[Path, list[str]]:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(into, filter="data")
    return into / MERGED_DIR, names


def test_merged_model_loads_plainly_and_matches_base_plus_adapter(
    tiny_model: Any, tiny_tokenizer: Any, base_dir: Path, adapter_archive: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    archive = merge_adapter(adapter_archive, out, str(base_dir))
    assert archive == out / MERGED_MODEL_ARCHIVE
    assert [p.name for p in out.iterdir()] == [MERGED_MODEL_ARCHIVE]  # no work dir, no .part

    merged_dir, names = _unpack(archive, tmp_path / "unpacked")
    files = {Path(n).name for n in names if n != MERGED_DIR}
    assert all(n == MERGED_DIR or n.startswith(f"{MERGED_DIR}/") for n in names)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files  # fmt: skip
    assert not [f for f in files if f.startswith("adapter_") or f.endswith((".bin", ".pt"))]
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "quantization_config" not in config

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer(PROBE).input_ids == tiny_tokenizer(PROBE).input_ids
    unpacked_adapter = tmp_path / "adapter"
    with tarfile.open(adapter_archive) as tar:
        tar.extractall(unpacked_adapter, filter="data")
    reference = PeftModel.from_pretrained(copy.deepcopy(tiny_model), unpacked_adapter / "adapter")
    expected = _logits(reference.eval(), tiny_tokenizer)
    got = _logits(merged, tokenizer)
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    moved = (expected - _logits(tiny_model, tiny_tokenizer)).abs().max().item()
    print(f"merged vs base+adapter: max |logit diff| {diff:.2e} (|logits| up to {scale:.1f}); "
          f"the adapter moved them by up to {moved:.2f}")  # fmt: skip
    assert diff <= FP32_TOLERANCE * scale
    assert moved > 1e-2  # the adapter matters: the merge is not compared with a no-op


def test_merged_model_keeps_the_base_dtype(
    tiny_model: Any, tiny_tokenizer: Any, adapter_archive: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    base = _save_base(tiny_model, tiny_tokenizer, tmp_path / "bf16-base", torch.bfloat16)
    archive = merge_adapter(adapter_archive, tmp_path / "out", str(base))
    merged_dir, _ = _unpack(archive, tmp_path / "unpacked")
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}


def test_an_archive_without_an_adapter_is_refused_before_loading(
    tmp_path: Path, base_dir: Path
) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").write_text("not an adapter")
    write_archive(tmp_path / "adapter", tmp_path / ADAPTER_ARCHIVE)
    with pytest.raises(ValueError, match="0 PEFT adapters"):
        merge_adapter(tmp_path / ADAPTER_ARCHIVE, tmp_path / "out", str(base_dir))
    assert not (tmp_path / "out").exists()


def test_a_failed_merge_leaves_nothing_behind(
    tiny_model: Any, adapter_archive: Path, tmp_path: Path
) -> None:
    class FullDisk:
        def save_pretrained(self, _path: Path) -> None:
            raise OSError(28, "No space left on device")

    with tarfile.open(adapter_archive) as tar:
        tar.extractall(tmp_path, filter="data")
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        merge_loaded(copy.deepcopy(tiny_model), FullDisk(), tmp_path / "adapter", out)
    assert list(out.iterdir()) == []
