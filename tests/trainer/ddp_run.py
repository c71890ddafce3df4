"""One process of a multi-process run, started by tests/trainer/test_data_parallel.py with
``torchrun`` (DDP) and by tests/trainer/test_fsdp.py with ``accelerate launch`` and an FSDP
config: the tiny random Llama of tests/conftest.py trained by ``fine_tune`` with an
``accelerate.Accelerator``; the main process saves the trained parameters and the history.

    ddp_run.py OUT CASE[,CASE...] [resume]

Each case (tests/trainer/data_parallel_case.py) runs in ``OUT/<case>``, one after the other
in the same processes: a launch costs more than a tiny model's run. With ``resume``, the
processes then train again in the same directory without its final checkpoint, so that they
resume after the one before (``resumed-*`` files)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer.data_parallel_case import build, run
from trainer import checkpoints
from trainer.train import TrainResult


def _keep(accelerator: Any, result: TrainResult, out_dir: Path, prefix: str) -> None:
    if accelerator.process_index == 1:
        # What the other process holds after training: its shards under FSDP.
        from torch.distributed.tensor import DTensor

        params = list(result.model.parameters())
        held = {
            "dtensors": sum(isinstance(p, DTensor) for p in params),
            "params": len(params),
            "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                         for p in params),
            "whole": sum(p.numel() for p in params),
        }  # fmt: skip
        (out_dir / f"{prefix}held.json").write_text(json.dumps(held))
    if accelerator.is_main_process:
        trained: dict[str, Any] = {
            n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad
        }
        torch.save(trained, out_dir / f"{prefix}trained.pt")
        (out_dir / f"{prefix}history.json").write_text(json.dumps(result.history))
        (out_dir / f"{prefix}resumed_from.json").write_text(json.dumps(result.resumed_from))
    accelerator.wait_for_everyone()


def main(out_dir: Path, cases: list[str], resume: bool) -> None:
    accelerator = Accelerator(cpu=True)
    for case in cases:
        run_case(accelerator, out_dir / case, case, resume)


def run_case(accelerator: Any, out_dir: Path, case: str, resume: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer, config = build(case)
    result = run(model, tokenizer, config, out_dir / "run", accelerator=accelerator)
    _keep(accelerator, result, out_dir, "")
    if not resume:
        return
    if accelerator.is_main_process:
        final = checkpoints.list_checkpoints(out_dir / "run")[-1]
        # The earlier one is the resumable one: copy it aside first (the test resumes from it
        # in one process too), as the resumed run rewrites it.
        shutil.copytree(final.path.parent, out_dir / "checkpoints-before-resume")
        shutil.rmtree(final.path)
    accelerator.wait_for_everyone()
    model, tokenizer, config = build(case)
    result = run(model, tokenizer, config, out_dir / "run", accelerator=accelerator, resume=True)
    _keep(accelerator, result, out_dir, "resumed-")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:] == ["resume"])
