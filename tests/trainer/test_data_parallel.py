"""Data-parallel training: two CPU processes (torchrun, gloo, accelerate's DDP) take the steps
one process takes, on the tiny random Llama."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.data_parallel_case import build, run
from trainer import checkpoints

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CASES = ("lora", "full")


def test_two_processes_take_the_steps_of_one(tmp_path: Path) -> None:
    """LoRA and full fine-tuning, one after the other in one launch."""
    singles = {}
    for case in CASES:
        model, tokenizer, config = build(case)
        singles[case] = run(model, tokenizer, config, tmp_path / case / "single")
        # The KL term is live (the first LoRA step starts at the reference: KL 0 there).
        assert singles[case].total_steps == 4 and singles[case].history[-1]["kl"] > 0

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(HERE / "ddp_run.py"), str(tmp_path), ",".join(CASES),
    ]  # fmt: skip
    # One thread per process: two processes share the two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    for case, single in singles.items():
        out = tmp_path / case
        history = json.loads((out / "history.json").read_text())
        assert [h["step"] for h in history] == [1, 2, 3, 4], case
        for two, one in zip(history, single.history, strict=True):
            for key in ("loss", "ce", "kl", "grad_norm", "trained_tokens"):
                # Sums of the same terms in another order (per process, then across them).
                assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (case, key)
        trained = torch.load(out / "trained.pt")
        expected = {n: p for n, p in single.model.named_parameters() if p.requires_grad}
        assert trained.keys() == expected.keys(), case
        for name, value in trained.items():
            torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-4, msg=name)
        # The main process alone wrote the checkpoints, the same steps as one process.
        steps = [c.step for c in checkpoints.list_checkpoints(out / "run")]
        assert steps == [c.step for c in checkpoints.list_checkpoints(out / "single")] == [2, 4]
