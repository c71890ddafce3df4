"""Where jobs run: RQ on Redis in production, a thread in the API process when embedded.

Both run the same task functions, given as functions (RQ stores their import path) and plain
JSON arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Protocol

from service.core.config import Settings, get_settings

log = logging.getLogger(__name__)

SCORING_QUEUE = "scoring"
TRAINING_QUEUE = "training"


Task = Callable[..., None]


class JobQueue(Protocol):
    def enqueue(self, queue: str, func: Task, *args: Any, job_id: str | None = None) -> None: ...

    def ping(self) -> bool: ...


class InProcessQueue:
    """One worker thread: jobs run one at a time, like a single RQ worker."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sarft-job")

    def enqueue(self, queue: str, func: Task, *args: Any, job_id: str | None = None) -> None:
        def run() -> None:
            try:
                func(*args)
            except Exception:  # the task records its own failure
                log.exception("in-process job %s%r failed", func.__qualname__, args)

        self._pool.submit(run)

    def ping(self) -> bool:
        return True


class RQQueue:
    def __init__(self, settings: Settings) -> None:
        from redis import Redis

        assert settings.redis_url
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url)

    def rq_queue(self, name: str) -> Any:
        from rq import Queue
        from rq.serializers import JSONSerializer

        return Queue(
            self.settings.queue_prefix + name, connection=self.redis, serializer=JSONSerializer
        )

    def enqueue(self, queue: str, func: Task, *args: Any, job_id: str | None = None) -> None:
        self.rq_queue(queue).enqueue(
            func,
            args=args,
            job_id=job_id,
            job_timeout=self.settings.job_timeout_s,
            result_ttl=24 * 3600,
            failure_ttl=7 * 24 * 3600,
        )

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except Exception:
            return False


@lru_cache
def get_queue() -> JobQueue:
    settings = get_settings()
    return InProcessQueue() if settings.embedded_queue else RQQueue(settings)
