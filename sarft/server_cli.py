"""Server-side commands: serve, worker, keys, db."""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Any

import typer

keys_app = typer.Typer(help="API keys.")
db_app = typer.Typer(help="Database migrations.")
log = logging.getLogger("sarft")


def _reaper(every: float) -> None:
    """Every process that runs jobs also watches for jobs whose worker died, and for queued
    jobs the queue lost."""
    from service.fine_tuning.tasks import reap_stale_jobs, requeue_lost_jobs
    from service.scoring_jobs.tasks import reap_stale_shards, requeue_lost_shards

    def loop() -> None:
        while True:
            try:
                if n := reap_stale_shards():
                    log.warning("re-queued or failed %d stale shard(s)", n)
                if n := reap_stale_jobs():
                    log.warning("failed %d fine-tuning job(s) whose worker stopped", n)
                if n := requeue_lost_shards() + requeue_lost_jobs():
                    log.warning("queued again %d job(s) or shard(s) the queue had lost", n)
            except Exception as exc:  # the database or Redis is down: try again next round
                log.warning("reaper: %s: %s", type(exc).__name__, exc)
            threading.Event().wait(every)

    threading.Thread(target=loop, daemon=True, name="sarft-reaper").start()


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if new.")],
    name: Annotated[
        str | None,
        typer.Option(help="Who uses the key: recorded with each review it makes."),
    ] = None,
) -> None:
    """Create an API key; the key is printed alone on the last line, once."""
    from service.core.auth import create_key
    from service.core.db import session_scope
    from service.core.migrate import upgrade

    upgrade()
    with session_scope() as session:
        try:
            key = create_key(session, tenant, name)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    typer.echo(f"API key for tenant {tenant!r} (shown once, store it now):", err=True)
    typer.echo(key)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations."""
    from service.core.config import get_settings
    from service.core.migrate import upgrade

    upgrade()
    typer.echo(f"database at head: {get_settings().sqlalchemy_url.split('@')[-1]}")


def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="API processes (production: about one per core; needs SARFT_REDIS_URL, as "
            "embedded jobs run inside the one API process).",
        ),
    ] = 1,
) -> None:
    """Run the API (migrating first); with no Redis configured, jobs run in-process."""
    import uvicorn
    from sqlalchemy import func, select

    from service.app import create_app
    from service.core.auth import create_key
    from service.core.config import get_settings
    from service.core.db import session_scope
    from service.core.migrate import upgrade
    from service.core.state_dirs import owner_only_umask, secure_state
    from service.models import ApiKey

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    owner_only_umask()
    settings = get_settings()
    if workers > 1 and settings.embedded_queue:
        typer.echo("error: --workers > 1 needs SARFT_REDIS_URL (a shared job queue)", err=True)
        raise typer.Exit(2)
    secure_state(settings)
    upgrade()
    with session_scope() as session:
        if not session.scalar(select(func.count()).select_from(ApiKey)):
            key = create_key(session, "default")
            typer.echo(f"first start: API key for tenant 'default' (shown once):\n{key}")
    if settings.embedded_queue:
        from service.fine_tuning import tasks as fine_tuning_tasks
        from service.scoring_jobs import tasks as scoring_tasks

        scoring_tasks.recover_embedded()
        fine_tuning_tasks.recover_embedded()
        _reaper(max(1.0, settings.stale_after_s / 4))
    if workers > 1:
        # Each process builds its own app (and database pool) from the factory.
        uvicorn.run(
            "service.app:create_app", factory=True, host=host, port=port, workers=workers,
            log_level="info",
        )  # fmt: skip
        return
    app = create_app()
    _quiet_gc()
    uvicorn.run(app, host=host, port=port, log_level="info")


def _quiet_gc() -> None:
    """Fewer, shorter collector pauses: every request allocates and frees short-lived
    objects, and a young-generation collection every 700 allocations (the default) puts
    pauses into the latency tail; the start-up objects are frozen out of collection."""
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def worker(
    queue: Annotated[list[str], typer.Option(help="Queue(s) to serve: scoring, training.")],
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
) -> None:
    """Run an RQ worker until stopped: scoring loads its model once; training loads the job's
    model per job (training changes the weights)."""
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    from service.core.config import get_settings
    from service.core.queue import SCORING_QUEUE
    from service.core.state_dirs import owner_only_umask

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    owner_only_umask()  # the adapters and reports it writes are tenants' data
    settings = get_settings()
    if not settings.redis_url:
        typer.echo(
            "SARFT_REDIS_URL is not set: embedded mode runs jobs inside `sarft serve`", err=True
        )
        raise typer.Exit(2)
    if SCORING_QUEUE in queue:
        from sarft.checks import check_model
        from service.scoring_jobs.tasks import backend_for, default_config

        for model in settings.allowed_models:  # a bad name fails now, in one line
            check_model(model)

        backend_for(default_config())  # load before the first job, not during it
    _reaper(max(1.0, settings.stale_after_s / 4))
    redis = Redis.from_url(settings.redis_url)
    queues = [
        Queue(settings.queue_prefix + q, connection=redis, serializer=JSONSerializer) for q in queue
    ]
    try:
        _serve(queues, redis, burst)
    finally:
        if SCORING_QUEUE in queue:
            from service.scoring_jobs.tasks import close_backends

            close_backends()  # a vLLM engine's processes would hold the exit up


def _serve(queues: list[Any], redis: Any, burst: bool) -> None:
    from redis.exceptions import RedisError
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer

    while True:
        # SimpleWorker runs jobs in this process, where the model is already loaded
        # (a forking worker would reload it, and CUDA does not survive a fork).
        rq_worker = SimpleWorker(queues, connection=redis, serializer=JSONSerializer)
        try:
            rq_worker.work(burst=burst)
        except RedisError as exc:  # raised by the loop's teardown while Redis is down
            log.warning("worker loop: %s", exc)
        # RQ's loop quits on an error it does not handle, such as Redis going away as a job
        # ends; the model stays loaded and a new loop starts once Redis answers again.
        if burst or _stop_was_requested(rq_worker):
            return
        log.warning("the worker loop ended (Redis unreachable?); restarting when Redis answers")
        _wait_for_redis(redis)


def _stop_was_requested(rq_worker: Any) -> bool:
    """Whether RQ's loop ended on SIGTERM/SIGINT: RQ records the time of the request (an idle
    worker stops at once, a busy one after its job), and sets no public flag."""
    return getattr(rq_worker, "_shutdown_requested_date", None) is not None or bool(
        getattr(rq_worker, "_stop_requested", False)
    )


def _wait_for_redis(redis: Any) -> None:
    from redis.exceptions import RedisError

    while True:
        try:
            if redis.ping():
                return
        except RedisError:
            pass
        time.sleep(1.0)
