"""Where jobs run: RQ on Redis in production, a thread in the API process when embedded.

Both run the same task functions, given as functions (RQ stores their import path) and plain
JSON arguments. The database, not the queue, is the record of what must run: a task is
enqueued after its rows commit, under a stable id, and a sweeper enqueues again any queued
row whose task the queue no longer holds (Redis was down at the commit, or restarted empty).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Protocol

from service.core.config import Settings, get_settings
from service.core.errors import ServiceUnavailable

log = logging.getLogger(__name__)

SCORING_QUEUE = "scoring"
TRAINING_QUEUE = "training"


Task = Callable[..., None]


class JobQueue(Protocol):
    def enqueue(self, queue: str, func: Task, *args: Any, job_id: str) -> None: ...

    def holds(self, queue: str, job_id: str) -> bool:
        """Whether the task ``job_id`` is waiting or running (False once lost or finished)."""
        ...

    def ping(self) -> bool: ...


class InProcessQueue:
    """One worker thread: jobs run one at a time, like a single RQ worker."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sarft-job")
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def enqueue(self, queue: str, func: Task, *args: Any, job_id: str) -> None:
        def run() -> None:
            try:
                func(*args)
            except Exception:  # the task records its own failure
                log.exception("in-process job %s%r failed", func.__qualname__, args)
            finally:
                with self._lock:
                    self._held.discard(job_id)

        with self._lock:
            self._held.add(job_id)
        self._pool.submit(run)

    def holds(self, queue: str, job_id: str) -> bool:
        with self._lock:
            return job_id in self._held

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

    def enqueue(self, queue: str, func: Task, *args: Any, job_id: str) -> None:
        self.rq_queue(queue).enqueue(
            func,
            args=args,
            job_id=self.task_id(job_id),
            job_timeout=self.settings.job_timeout_s,
            result_ttl=24 * 3600,
            failure_ttl=7 * 24 * 3600,
        )

    def task_id(self, job_id: str) -> str:
        """The prefix keeps deployments sharing one Redis apart, as in the queue names; RQ
        allows only letters, digits, _ and - in job ids."""
        return re.sub(r"[^A-Za-z0-9_-]", "-", self.settings.queue_prefix) + job_id

    def holds(self, queue: str, job_id: str) -> bool:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        try:
            job = Job.fetch(self.task_id(job_id), connection=self.redis)
        except NoSuchJobError:
            return False
        status = job.get_status(refresh=False)
        return status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED)

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except Exception:
            return False


@lru_cache
def get_queue() -> JobQueue:
    settings = get_settings()
    return InProcessQueue() if settings.embedded_queue else RQQueue(settings)


def dispatch(queue: str, func: Task, *args: Any, job_id: str) -> bool:
    """Enqueue once the rows are committed; an unreachable queue is logged, not raised: the
    rows stay queued and the sweeper enqueues them when the queue is back."""
    try:
        get_queue().enqueue(queue, func, *args, job_id=job_id)
    except Exception as exc:
        log.warning("could not enqueue %s (%s); the sweeper retries", job_id, exc)
        return False
    return True


def require_queue() -> None:
    """Refuse (503) to create work while the queue is unreachable, before anything is stored."""
    if not get_queue().ping():
        raise ServiceUnavailable("the job queue (Redis) is unreachable; nothing was stored, retry")
