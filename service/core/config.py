"""Service settings, read from ``SARFT_*`` environment variables.

With neither ``SARFT_DATABASE_URL`` nor ``SARFT_REDIS_URL`` set, everything runs
embedded: a SQLite file and jobs on a thread inside the API process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.eval_sets import BUILTIN_PROMPTS, BUILTIN_SET
from worker.home import DEFAULT_HOME
from worker.packaged_models import BUNDLED_ALIAS
from worker.vllm_engine import VllmEngineOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SARFT_", extra="ignore")

    home: Path = Field(default=DEFAULT_HOME)
    """State directory: the SQLite file, uploads, artifacts, the model cache."""
    database_url: str | None = None
    """SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default: SQLite under home."""
    redis_url: str | None = None
    """Redis for the RQ queues; unset runs jobs in-process (the embedded default)."""
    queue_prefix: str = ""
    """Prepended to queue names, so several deployments (or test runs) share one Redis."""
    max_upload_bytes: int = 512 * 1024 * 1024
    """Uploads beyond this are refused with 413."""
    scoring_model: str | None = None
    """Model for scoring jobs that name none: an HF id, a local directory or a packaged name
    (``sarft models list``: ``qwen2.5-coder-0.5b-instruct``); unset: the bundled
    SmolLM2-135M-Instruct."""
    extra_models: str = ""
    """Comma-separated further models that scoring jobs may name (each loads on first use)."""
    scoring_backend: str = "transformers"
    """``vllm`` scores with vLLM's engine (a CUDA GPU, or an x86 CPU with vLLM's CPU build);
    its workers run in the environment ``make install-vllm`` builds (README: vLLM)."""
    vllm_kv_cache_gib: float | None = Field(default=None, gt=0)
    """vLLM's KV-cache memory in GiB; unset: 2 GiB on a CPU (where vLLM would otherwise take
    a share of RAM), ``vllm_gpu_memory_utilization`` on a GPU."""
    vllm_gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    """Share of the GPU's memory a vLLM engine may take (weights, activations, KV cache)."""
    vllm_enforce_eager: bool | None = None
    """Skip vLLM's compilation; unset: on a CPU only (compiling takes minutes there)."""
    scoring_dtype: str = "float32"
    """float32 is exact; bfloat16 is faster and keeps float32's flags by scoring the samples
    near the boundary again in float32 (see README)."""
    chunk_size: int = 64
    """Samples scored and committed together: the unit of progress and of resume."""
    shard_size: int = 5000
    """Samples per shard; shards of one job run in parallel on several workers."""
    job_timeout_s: int = 24 * 3600
    heartbeat_s: float = 5.0
    """How often a running shard or fine-tuning job proves its worker is alive."""
    stale_after_s: float = 120.0
    """A running shard or fine-tuning job whose heartbeat is older than this lost its worker."""
    outage_grace_s: float = 300.0
    """How long a running scoring shard waits out an unreachable database (a restart, a
    failover) before it fails; it resumes where its last committed chunk ended."""
    max_attempts: int = 3
    """Runs of one scoring shard or fine-tuning job before a lost worker fails it instead of
    re-queueing it (a fine-tuning job resumes from its newest checkpoint)."""
    checkpoint_every: int = Field(default=10, ge=0)
    """Optimizer steps between a fine-tuning job's checkpoints (with validation metrics);
    the final step always gets one. 0: only the final step."""
    checkpoint_keep: int = Field(default=3, ge=1)
    """Checkpoints kept per fine-tuning job (the final one always is); older ones are deleted."""
    training_processes: int = Field(default=1, ge=1)
    """Data-parallel processes a training worker runs each fine-tuning job in (one per GPU):
    started with torchrun, or with ``accelerate launch`` when ``accelerate_config`` is set."""
    accelerate_config: Path | None = None
    """An ``accelerate config`` file for the training processes (FSDP, DeepSpeed, mixed
    precision); its process count is ``training_processes``."""
    eval_sets: str = ""
    """Harmful-prompt sets fine-tuning jobs may evaluate on, ``name=path`` comma-separated,
    e.g. ``advbench=/data/eval/harmful_behaviors.csv``: AdvBench or BeaverTails CSV, or JSONL
    of {"prompt"}. A set named ``builtin`` (8 self-written prompts shipped with sarft) is always
    there. Jobs may also send their own prompts inline."""
    default_eval_sets: str = ""
    """Comma-separated set names a job evaluates on when it names none; empty: every set of
    ``eval_sets``, or ``builtin`` when that is empty too."""
    artifacts_dir: Path | None = None
    """Adapters, checkpoints and reports (default: ``home/artifacts``). The API serves them and
    the trainer workers write them, so all of them must see the same directory."""
    judge_api_key: str | None = None
    """Bearer key for the LLM judge endpoint that fine-tuning jobs may name (never stored)."""

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home_dir / 'sarft.db'}"

    @property
    def uploads_dir(self) -> Path:
        return self.home_dir / "uploads"

    @property
    def artifacts_path(self) -> Path:
        return (self.artifacts_dir or self.home_dir / "artifacts").expanduser()

    @property
    def eval_set_paths(self) -> dict[str, Path]:
        """Every safety set by name: ``builtin``, then those of ``eval_sets``."""
        paths: dict[str, Path] = {BUILTIN_SET: BUILTIN_PROMPTS}
        for item in self.eval_sets.split(","):
            if not item.strip():
                continue
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"SARFT_EVAL_SETS: expected name=path, got {item.strip()!r}")
            paths[name.strip()] = Path(path.strip()).expanduser()
        return paths

    @property
    def default_eval_set_names(self) -> list[str]:
        names = [n.strip() for n in self.default_eval_sets.split(",") if n.strip()]
        if names:
            unknown = sorted(set(names) - set(self.eval_set_paths))
            if unknown:
                raise ValueError(f"SARFT_DEFAULT_EVAL_SETS names unknown sets: {unknown}")
            return names
        configured = [n for n in self.eval_set_paths if n != BUILTIN_SET]
        return configured or [BUILTIN_SET]

    @property
    def allowed_models(self) -> set[str]:
        default = self.scoring_model or BUNDLED_ALIAS
        return {default, *(m.strip() for m in self.extra_models.split(",") if m.strip())}

    @property
    def vllm_engine_options(self) -> VllmEngineOptions:
        return VllmEngineOptions(
            kv_cache_gib=self.vllm_kv_cache_gib,
            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            enforce_eager=self.vllm_enforce_eager,
        )

    @property
    def embedded_queue(self) -> bool:
        return not self.redis_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
