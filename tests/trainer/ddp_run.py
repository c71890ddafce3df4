"""One process of a data-parallel run, started by tests/trainer/test_data_parallel.py with
``torchrun``: the tiny random Llama of tests/conftest.py trained by ``fine_tune`` with an
``accelerate.Accelerator``; the main process saves the trained parameters and the history."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer.data_parallel_case import build, run


def main(out_dir: Path, case: str) -> None:
    accelerator = Accelerator(cpu=True)
    model, tokenizer, config = build(case)
    result = run(model, tokenizer, config, out_dir / "run", accelerator=accelerator)
    if accelerator.is_main_process:
        trained: dict[str, Any] = {
            n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad
        }
        torch.save(trained, out_dir / "trained.pt")
        (out_dir / "history.json").write_text(json.dumps(result.history))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
