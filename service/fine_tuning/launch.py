"""One process of a data-parallel fine-tuning job.

``sarft worker --queue training`` with ``SARFT_TRAINING_PROCESSES=N`` claims a job, then starts
N of these with ``torchrun`` (or ``accelerate launch`` with ``SARFT_ACCELERATE_CONFIG``) and
keeps the job's heartbeat while they run:

    python -m service.fine_tuning.launch JOB_ID ATTEMPT

Every process reads the job's rows and trains (:func:`trainer.train.fine_tune` shares each
step's micro-batches among them); the main one also evaluates, reports, records the job's
events and outcome, exactly as a single-process worker does.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta

from service.core.state_dirs import owner_only_umask
from service.fine_tuning.inputs import load_inputs
from service.fine_tuning.storage import artifact_dir
from service.fine_tuning.tasks import checkpoint_settings, run_attempt
from trainer.run_spec import RunCancelled

# The main process evaluates the base model while the others wait in their first collective:
# long enough for a large evaluation, instead of the process group's 30-minute default.
COLLECTIVE_TIMEOUT = timedelta(hours=12)


def main(job_id: str, attempt: int) -> int:
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    from trainer.pipeline import run_fine_tuning

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
    )
    try:
        if accelerator.is_main_process:
            run_attempt(job_id, attempt, accelerator)
        else:
            run_fine_tuning(
                load_inputs(job_id),
                artifact_dir(job_id),
                checkpoint_settings=checkpoint_settings(),
                resume=attempt > 1,
                accelerator=accelerator,
            )
    except RunCancelled:
        # Cancelled: every process stops at the same step; the main one has recorded nothing
        # more and removed the files.
        return 0
    return 0


if __name__ == "__main__":
    owner_only_umask()
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
