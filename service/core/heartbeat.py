"""A thread that proves a job's worker is alive while long work runs between commits."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Executable

from service.core.db import session_scope

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Runs ``beat()`` (an UPDATE setting ``heartbeat_at``) every ``every`` seconds until stopped.

    A reaper treats a running job whose heartbeat is older than ``SARFT_STALE_AFTER_S`` as lost.
    """

    def __init__(self, name: str, every: float, beat: Callable[[], Executable]) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{name}")
        self.every, self.beat = every, beat
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                with session_scope() as session:
                    session.execute(self.beat())
            except Exception:
                log.exception("heartbeat failed")

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopped.set()
