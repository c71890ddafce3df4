"""FSDP: two CPU processes started by ``accelerate launch`` with examples/accelerate/fsdp.yaml
(FSDP2, ZeRO-2, gloo) or fsdp-zero3.yaml (ZeRO-3) take the steps one process takes on the tiny
random Llama, save the same adapter or model, and (ZeRO-2) resume from their checkpoint as the
uninterrupted run goes on; one process resumes from it too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from safetensors.torch import load_file

from tests.trainer.data_parallel_case import build, run
from tests.trainer.test_data_parallel import free_port
from tests.trainer.test_train import FLAGS
from trainer import checkpoints
from trainer.data import TrainExample, step_batches
from trainer.ranks import FsdpSettings, Ranks
from trainer.steps import plan_micro_batches

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parents[1] / "examples" / "accelerate"
KEYS = ("loss", "ce", "kl", "grad_norm", "trained_tokens")
VALIDATION_KEYS = ("valid_loss", "valid_ce", "valid_kl")  # at the checkpoints


def close_histories(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [h["step"] for h in got] == [h["step"] for h in expected]
    for two, one in zip(got, expected, strict=True):
        assert two.keys() == one.keys()
        for key in (*KEYS, *(k for k in VALIDATION_KEYS if k in one)):
            # Sums of the same terms in another order (per process, then across processes;
            # the reduce-scatter adds the shards' halves in its own order).
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (key, two, one)


def close_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def saved_weights(out: Path, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        return load_file(out / "adapter" / "adapter_model.safetensors")
    return load_file(out / "model" / "model.safetensors")


CASES = ("lora", "full")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_fsdp_processes_take_the_steps_of_one(stage: str, tmp_path: Path) -> None:
    """LoRA and full fine-tuning, one after the other in one launch per stage."""
    singles = {}
    for case in CASES:
        model, tokenizer, config = build(case)
        singles[case] = run(model, tokenizer, config, tmp_path / case / "single")
        assert singles[case].total_steps == 4 and singles[case].history[-1]["kl"] > 0

    # ZeRO-3 shares ZeRO-2's gathering and loading code: its launch skips the resumed run (the
    # one-process resume below still loads its checkpoint) to keep the test short.
    zero3 = stage == "zero3"
    config_file = CONFIGS / ("fsdp-zero3.yaml" if zero3 else "fsdp.yaml")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "--num_processes", "2", "--main_process_port", str(free_port()),
        str(HERE / "ddp_run.py"), str(tmp_path), ",".join(CASES), *([] if zero3 else ["resume"]),
    ]  # fmt: skip
    # One thread per process: two processes share the two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for case, single in singles.items():
        check_sharded_run(case, single, tmp_path / case, zero3)


def check_sharded_run(case: str, single: Any, out: Path, zero3: bool) -> None:
    # The second process kept only its shards: about half of every parameter.
    held = json.loads((out / "held.json").read_text())
    assert held["dtensors"] == held["params"] and held["local"] <= held["whole"] / 2 + 1000

    expected = {n: p for n, p in single.model.named_parameters() if p.requires_grad}
    close_histories(json.loads((out / "history.json").read_text()), single.history)
    close_weights(torch.load(out / "trained.pt"), expected)
    # What the main process saved from the gathered shards: the adapter (or model) files.
    lora = case == "lora"
    close_weights(saved_weights(out / "run", lora), saved_weights(out / "single", lora))
    steps = [c.step for c in checkpoints.list_checkpoints(out / "run")]
    assert steps == [c.step for c in checkpoints.list_checkpoints(out / "single")] == [2, 4]

    if zero3:
        source = checkpoints.step_dir(out / "run", 2)
    else:
        # Resumed after step 2 (gathered weights and optimizer state), the processes end where
        # the uninterrupted run ended.
        assert json.loads((out / "resumed-resumed_from.json").read_text()) == 2
        history = json.loads((out / "resumed-history.json").read_text())
        close_histories(history, single.history)
        close_weights(torch.load(out / "resumed-trained.pt"), expected)
        source = out / "checkpoints-before-resume" / "step-000002"

    # The checkpoint of the sharded run resumes in one process as well.
    cross = out / "cross"
    shutil.copytree(source, checkpoints.step_dir(cross, 2))
    model, tokenizer, config = build(case)
    resumed = run(model, tokenizer, config, cross, resume=True)
    assert resumed.resumed_from == 2
    close_histories(resumed.history, single.history)
    close_weights({n: p for n, p in resumed.model.named_parameters() if p.requires_grad}, expected)


def test_zero3_runs_exercise_the_lockstep() -> None:
    """The steps of the run above, shared out as under ZeRO-3: in some step the processes have
    different numbers of micro-batches, and at some micro-batch only one of them has flagged
    rows (so the other pads, and runs the reference only to pair with it)."""
    _, _, config = build("lora")
    examples = [TrainExample([0, 1], [-100, 1], flag) for flag in FLAGS]
    uneven = paired = False
    for step in step_batches(examples, config.batch_size, 4, config.seed):
        step = sorted(step, key=lambda e: not e.kl_flag)  # as the training step sorts them
        size = config.micro_batch_size
        plans = [
            plan_micro_batches(step, size, 2, rank, lockstep=True, pair_kl=True) for rank in (0, 1)
        ]
        assert len(plans[0].chunks) == len(plans[1].chunks)
        assert plans[0].pair_reference == plans[1].pair_reference
        real = [sum(c is not None for c in plan.chunks) for plan in plans]
        uneven |= real[0] != real[1]
        for j, pair in enumerate(plans[0].pair_reference):
            own = [any(e.kl_flag for e in plan.chunks[j] or ()) for plan in plans]
            paired |= pair and own.count(True) == 1
        # Data parallel and ZeRO-2 runs are as before: no padding, no paired references.
        plain = plan_micro_batches(step, size, 2, 1, lockstep=False, pair_kl=True)
        assert plain.chunks == [step[i : i + size] for i in range(size, len(step), 2 * size)]
        assert not any(plain.pair_reference)
    assert uneven and paired


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FSDP_VERSION": "1"}, "fsdp_version: 2"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "fsdp_activation_checkpointing"),
    ],
)
def test_fsdp_settings_sarft_cannot_run_are_refused(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment ``accelerate launch`` makes of examples/accelerate/fsdp.yaml, changed.
    base = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_ACTIVATION_CHECKPOINTING": "false",
    }
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(key, value)

    # accelerate's plugin reads the environment, as in each process on CPU.
    settings = FsdpSettings(FullyShardedDataParallelPlugin())
    with pytest.raises(ValueError, match=message):
        settings.check()
    for key in env:
        monkeypatch.setenv(key, base[key])
    FsdpSettings(FullyShardedDataParallelPlugin()).check()  # the example's settings pass


@pytest.mark.parametrize("value", ["true", "false"])
def test_fsdp_reshards_after_forward_as_configured(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", value)
    settings = FsdpSettings(FullyShardedDataParallelPlugin())
    settings.check()
    assert settings.reshard_after_forward is (value == "true")


def test_one_process_is_not_sharded() -> None:
    assert not Ranks().sharded


def test_gathered_weights_keep_tied_parameters_tied(tiny_tokenizer: Any) -> None:
    from tests.conftest import build_tiny_model
    from trainer.ranks import _load_assigned, _meta_skeleton

    model = build_tiny_model(tiny_tokenizer, tie_word_embeddings=True)
    skeleton = _meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    state = model.state_dict()
    del state["lm_head.weight"]  # held under the embedding's name only
    plain: Any = _load_assigned(skeleton, state)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    ids = torch.arange(6)[None]
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)
