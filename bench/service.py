"""Benchmark: the API service end to end over loopback: upload, then status polling.

    .venv/bin/python bench/service.py [--rows 100000] [--concurrency 32] [--seconds 20] \
        [--database postgres|sqlite] [--json bench/results/service.json]

Starts `sarft serve` on a free 127.0.0.1 port with a fresh SARFT_HOME, gets an API
key with `sarft keys create`, then:

1. uploads a synthetic RoleBench JSONL (--rows rows, ~300 bytes each) as one
   multipart request: wall time -> rows/s and MB/s, and the API process's RSS
   before and at its peak during the upload (VmRSS sampled every 50 ms, plus
   VmHWM when the upload set a new high-water mark);
2. polls one resource for --seconds seconds (at most 200,000 requests): closed loop with
   --concurrency asyncio tasks sharing one httpx.AsyncClient, or open loop with --rate
   requests/s (each request due at its time whatever the others do, its latency counted
   from then): requests/s, p50/p90/p99 latency, errors (non-200 or exceptions) and the
   server's CPU per request. --server-cpus / --client-cpus pin each side to its cores.

With --database postgres (default) the service uses a fresh Postgres database
(dropped at the end) and Redis db 9 under a unique queue prefix. No worker runs,
so the scoring job created on the dataset stays queued and the poll measures
GET /v1/scoring_jobs/{id}. With --database sqlite the service runs embedded,
where creating a scoring job would load the model inside the API process; the
poll then measures GET /v1/datasets/{id} instead.

The client runs on the same machine as the server, so on a small machine the
two compete for CPU; the CPU seconds each used during the poll are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, print_table, save_json

HOST = "127.0.0.1"
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/9"
MAX_POLL_REQUESTS = 200_000
DEFAULT_MAX_UPLOAD = 512 * 1024 * 1024
MIB = 1024 * 1024
SARFT = Path(sys.prefix) / "bin" / "sarft"


# --------------------------------------------------------------------------- data

_WORD_TEXT = (
    "ship sea captain rum treasure compass storm harbor crew island map gold sword wind "
    "sail night star moon promise honor bargain secret tavern journey cannon anchor "
    "horizon legend fortune mutiny parley voyage tide whisper shadow courage danger "
    "kingdom letter friend enemy bridge mountain river forest library lantern clock "
    "garden winter summer morning evening dream memory question answer reason truth "
    "always never perhaps certainly quietly boldly slowly quickly gladly rarely"
)
WORDS = _WORD_TEXT.split()
OPENERS = ("What", "Why", "How", "When", "Where", "Who", "Could you tell me", "Do you think")
ROLES = ("Bench Captain", "Bench Scholar", "Bench Innkeeper", "Bench Knight")


def _sentence(rng: random.Random, n: int) -> str:
    words = rng.choices(WORDS, k=n)
    return " ".join(words).capitalize()


def write_rolebench(path: Path, rows: int, seed: int = 0) -> int:
    """RoleBench JSONL with varied text, ~300 bytes a row; returns the file size."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            question = f"{rng.choice(OPENERS)} {_sentence(rng, rng.randint(6, 12)).lower()}?"
            answer = ". ".join(_sentence(rng, rng.randint(5, 10)) for _ in range(rng.randint(3, 4)))
            row = {
                "role": ROLES[i % len(ROLES)],
                "question": question,
                "generated": [f"{answer}. (#{i})"],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.stat().st_size


# ----------------------------------------------------------------------- process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def proc_status_kib(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class RssSampler:
    """Samples VmRSS of ``pid`` every ``every`` seconds on a thread; keeps the peak."""

    pid: int
    every: float = 0.05
    peak_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            if (rss := proc_status_kib(self.pid, "VmRSS")) is not None:
                self.peak_kib = max(self.peak_kib, rss)
                self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_problems(self, last: int = 10) -> tuple[int, list[str]]:
        """Count of the server log's WARNING/ERROR/Traceback lines, and the last few."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return 0, []
        bad = [
            line
            for line in text.splitlines()
            if line.startswith(("WARNING", "ERROR", "CRITICAL", "Traceback"))
        ]
        return len(bad), bad[-last:]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""


def start_server(env: dict[str, str], workdir: Path) -> Server:
    port = free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(SARFT), "serve", "--host", HOST, "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(proc, f"http://{HOST}:{port}", log_path)


def wait_healthy(server: Server, timeout: float = 180.0) -> float:
    start = time.perf_counter()
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        while time.perf_counter() - start < timeout:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"sarft serve exited with {server.proc.returncode}:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if client.get("/healthz").status_code == 200:
                    return time.perf_counter() - start
            time.sleep(0.1)
    raise RuntimeError(f"sarft serve not healthy after {timeout:.0f}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


def create_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(SARFT), "keys", "create", "--tenant", "bench"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"sarft keys create failed ({out.returncode}):\n{out.stderr[-4000:]}")
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"sarft keys create printed no key:\n{out.stderr[-4000:]}")
    return lines[-1]


# ---------------------------------------------------------------------- backends


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local Postgres; yields its name, drops it at the end."""
    import psycopg
    from psycopg import sql

    name = f"sarft_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


def clear_queues(prefix: str) -> None:
    """Delete the RQ queues (and their jobs) this run left under ``prefix`` in Redis db 9."""
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    redis = Redis.from_url(REDIS_URL)
    try:
        for name in ("scoring", "training"):
            Queue(prefix + name, connection=redis, serializer=JSONSerializer).delete(
                delete_jobs=True
            )
    finally:
        redis.close()


def service_env(home: Path, database: str, db_name: str | None, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARFT_")}
    env["SARFT_HOME"] = str(home)
    if database == "postgres":
        assert db_name is not None
        env["SARFT_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}"
        env["SARFT_REDIS_URL"] = REDIS_URL
        env["SARFT_QUEUE_PREFIX"] = prefix
    # Never let a proxy setting send loopback traffic elsewhere.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# ------------------------------------------------------------------------ phases


@dataclass
class UploadResult:
    seconds: float
    dataset_id: str
    num_samples: int
    rss_before_kib: int
    rss_peak_kib: int
    hwm_before_kib: int
    hwm_after_kib: int
    rss_after_kib: int
    rss_samples: int


def upload(client: httpx.Client, pid: int, path: Path, role_id: str) -> UploadResult:
    rss_before = proc_status_kib(pid, "VmRSS") or 0
    hwm_before = proc_status_kib(pid, "VmHWM") or 0
    with RssSampler(pid) as sampler, path.open("rb") as f:
        start = time.perf_counter()
        resp = client.post(
            "/v1/datasets",
            files={"file": (path.name, f, "application/jsonl")},
            data={"role_id": role_id},
            timeout=httpx.Timeout(30.0, read=1800.0, write=1800.0),
        )
        seconds = time.perf_counter() - start
    hwm_after = proc_status_kib(pid, "VmHWM") or 0
    rss_after = proc_status_kib(pid, "VmRSS") or 0
    if resp.status_code != 201:
        raise RuntimeError(f"upload failed: {resp.status_code} {resp.text[:2000]}")
    body = resp.json()
    peak = sampler.peak_kib
    if hwm_after > hwm_before:  # the upload set a new lifetime peak: HWM is exact
        peak = max(peak, hwm_after)
    return UploadResult(
        seconds=seconds,
        dataset_id=body["id"],
        num_samples=body["num_samples"],
        rss_before_kib=rss_before,
        rss_peak_kib=max(peak, rss_before),
        hwm_before_kib=hwm_before,
        hwm_after_kib=hwm_after,
        rss_after_kib=rss_after,
        rss_samples=sampler.samples,
    )


@dataclass
class PollResult:
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    first_error: str | None
    client_cpu_s: float
    server_cpu_s: float | None


async def _poll(
    base_url: str, headers: dict[str, str], url: str, concurrency: int, seconds: float, pid: int
) -> PollResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    issued = 0
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=30.0
    ) as client:
        # Warm-up (not counted): open the connections and touch the route once each.
        await asyncio.gather(*(client.get(url) for _ in range(concurrency)))

        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal issued, errors, first_error
            while issued < MAX_POLL_REQUESTS and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                try:
                    resp = await client.get(url)
                    ok = resp.status_code == 200
                    if not ok and first_error is None:
                        when = time.perf_counter() - start
                        first_error = f"at {when:.2f}s: {resp.status_code} {resp.text[:300]}"
                except Exception as exc:
                    ok = False
                    if first_error is None:
                        when = time.perf_counter() - start
                        first_error = f"at {when:.2f}s: {type(exc).__name__}: {exc}"
                latencies.append((time.perf_counter() - t0) * 1000.0)
                if not ok:
                    errors += 1

        cpu0, server0 = time.process_time(), proc_cpu_seconds(pid)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu1, server1 = time.process_time(), proc_cpu_seconds(pid)
    server_cpu = None if server0 is None or server1 is None else server1 - server0
    return PollResult(
        requests=len(latencies),
        seconds=elapsed,
        latencies_ms=latencies,
        errors=errors,
        first_error=first_error,
        client_cpu_s=cpu1 - cpu0,
        server_cpu_s=server_cpu,
    )


async def _poll_open_loop(
    base_url: str, headers: dict[str, str], url: str, rate: float, seconds: float, pid: int
) -> PollResult:
    """Open loop: request i is due at start + i / rate whatever the earlier ones are doing,
    and its latency counts from when it was due, so a slow server cannot slow the load down
    and hide its own queueing (no coordinated omission)."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=30.0
    ) as client:
        await asyncio.gather(*(client.get(url) for _ in range(16)))  # warm-up, not counted

        async def one(due: float) -> None:
            nonlocal errors, first_error
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                resp = await client.get(url)
                ok = resp.status_code == 200
                if not ok and first_error is None:
                    first_error = f"{resp.status_code} {resp.text[:300]}"
            except Exception as exc:
                ok = False
                if first_error is None:
                    first_error = f"{type(exc).__name__}: {exc}"
            latencies.append((time.perf_counter() - due) * 1000.0)
            if not ok:
                errors += 1

        total = min(MAX_POLL_REQUESTS, int(rate * seconds))
        cpu0, server0 = time.process_time(), proc_cpu_seconds(pid)
        start = time.perf_counter() + 0.05
        await asyncio.gather(*(one(start + i / rate) for i in range(total)))
        elapsed = time.perf_counter() - start
        cpu1, server1 = time.process_time(), proc_cpu_seconds(pid)
    server_cpu = None if server0 is None or server1 is None else server1 - server0
    return PollResult(
        requests=len(latencies),
        seconds=elapsed,
        latencies_ms=latencies,
        errors=errors,
        first_error=first_error,
        client_cpu_s=cpu1 - cpu0,
        server_cpu_s=server_cpu,
    )


def poll(
    base_url: str,
    headers: dict[str, str],
    url: str,
    concurrency: int,
    seconds: float,
    pid: int,
    rate: float | None = None,
) -> PollResult:
    if rate:
        return asyncio.run(_poll_open_loop(base_url, headers, url, rate, seconds, pid))
    return asyncio.run(_poll(base_url, headers, url, concurrency, seconds, pid))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


# -------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:10]}:"
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sarft-bench-")))
        db_name: str | None = None
        if args.database == "postgres":
            db_name = stack.enter_context(postgres_database())
            stack.callback(clear_queues, prefix)
        home = workdir / "home"
        home.mkdir()
        data_path = workdir / "rolebench.jsonl"

        t0 = time.perf_counter()
        size = write_rolebench(data_path, args.rows)
        print(
            f"wrote {args.rows:,} rows, {size / MIB:.1f} MiB ({size / args.rows:.0f} B/row) "
            f"in {time.perf_counter() - t0:.1f}s"
        )

        env = service_env(home, args.database, db_name, prefix)
        env["SARFT_MAX_UPLOAD_BYTES"] = str(max(DEFAULT_MAX_UPLOAD, size + MIB))
        server = start_server(env, workdir)
        stack.callback(stop_server, server)  # runs before the database is dropped
        startup = wait_healthy(server)
        print(f"sarft serve ({args.database}) healthy at {server.base_url} after {startup:.1f}s")
        key = create_key(env)
        headers = {"Authorization": f"Bearer {key}"}
        pid = server.proc.pid

        with httpx.Client(base_url=server.base_url, headers=headers, timeout=30.0) as client:
            resp = client.post(
                "/v1/roles", json={"name": "Bench Captain", "profile": "A synthetic captain."}
            )
            resp.raise_for_status()
            role_id = resp.json()["id"]

            up = upload(client, pid, data_path, role_id)
            if up.num_samples != args.rows:
                raise RuntimeError(f"num_samples {up.num_samples} != rows {args.rows}")
            print(
                f"uploaded {up.num_samples:,} samples in {up.seconds:.2f}s "
                f"(RSS {up.rss_before_kib / 1024:.0f} -> peak {up.rss_peak_kib / 1024:.0f} MiB, "
                f"{up.rss_samples} samples; after {up.rss_after_kib / 1024:.0f} MiB)"
            )

            if args.database == "postgres":
                resp = client.post("/v1/scoring_jobs", json={"dataset_id": up.dataset_id})
                if resp.status_code != 201:
                    raise RuntimeError(f"job create failed: {resp.status_code} {resp.text[:2000]}")
                job = resp.json()
                poll_url = f"/v1/scoring_jobs/{job['id']}"
                print(f"scoring job {job['id']} {job['status']} (no worker: stays queued)")
            else:
                poll_url = f"/v1/datasets/{up.dataset_id}"
                print(
                    "sqlite (embedded) mode: no scoring job is created, since it would load "
                    f"the model inside the API; polling GET {poll_url} instead"
                )

        if args.server_cpus:
            os.sched_setaffinity(pid, args.server_cpus)
        if args.client_cpus:
            os.sched_setaffinity(0, args.client_cpus)
        load = f"{args.rate:g} requests/s, open loop" if args.rate else f"{args.concurrency} tasks"
        print(f"polling GET {poll_url}: {load}, {args.seconds:g}s ...")
        pr = poll(
            server.base_url, headers, poll_url, args.concurrency, args.seconds, pid, args.rate
        )
        if pr.first_error:
            print(f"first poll error {pr.first_error}")
        log_problems, last_problems = server.log_problems()
        if log_problems:
            print(f"server log: {log_problems} WARNING/ERROR line(s), the last ones:")
            for line in last_problems:
                print("   ", line[:300])

    lat = sorted(pr.latencies_ms)
    return {
        "rows": args.rows,
        "upload_bytes": size,
        "upload_seconds": up.seconds,
        "upload_rows_per_s": args.rows / up.seconds,
        "upload_mb_per_s": size / 1e6 / up.seconds,
        "api_rss_before_mib": up.rss_before_kib / 1024,
        "api_rss_peak_mib": up.rss_peak_kib / 1024,
        "api_rss_after_mib": up.rss_after_kib / 1024,
        "api_hwm_before_mib": up.hwm_before_kib / 1024,
        "api_hwm_after_mib": up.hwm_after_kib / 1024,
        "poll_target": poll_url.rsplit("/", 1)[0] + "/{id}",
        "poll_requests": pr.requests,
        "poll_seconds": pr.seconds,
        "poll_rps": pr.requests / pr.seconds if pr.seconds > 0 else 0.0,
        "poll_p50_ms": percentile(lat, 50),
        "poll_p90_ms": percentile(lat, 90),
        "poll_p99_ms": percentile(lat, 99),
        "poll_errors": pr.errors,
        "poll_first_error": pr.first_error,
        "server_log_problems": log_problems,
        "poll_client_cpu_s": pr.client_cpu_s,
        "poll_server_cpu_s": pr.server_cpu_s,
        "server_cpu_ms_per_request": (
            None
            if pr.server_cpu_s is None or not pr.requests
            else 1000 * pr.server_cpu_s / pr.requests
        ),
        "rate": args.rate,
        "server_cpus": sorted(args.server_cpus or []),
        "client_cpus": sorted(args.client_cpus or []),
        "database": args.database,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--rate", type=float, default=None,
        help="open-loop load: this many requests/s whatever the latency (else closed loop)",
    )  # fmt: skip
    parser.add_argument(
        "--server-cpus", type=lambda v: {int(c) for c in v.split(",")}, default=None,
        help="pin the API process to these cores, e.g. 0",
    )  # fmt: skip
    parser.add_argument(
        "--client-cpus", type=lambda v: {int(c) for c in v.split(",")}, default=None,
        help="pin the load generator to these cores, e.g. 1",
    )  # fmt: skip
    args = parser.parse_args()
    if args.rows < 1 or args.concurrency < 1 or args.seconds <= 0:
        parser.error("--rows and --concurrency must be >= 1 and --seconds > 0")

    result = run(args)
    print()
    print_table(
        ["metric", "value"],
        [
            ["database", result["database"]],
            ["rows", result["rows"]],
            ["upload MiB", result["upload_bytes"] / MIB],
            ["upload s", result["upload_seconds"]],
            ["upload rows/s", result["upload_rows_per_s"]],
            ["upload MB/s", result["upload_mb_per_s"]],
            ["API RSS before (MiB)", result["api_rss_before_mib"]],
            ["API RSS peak (MiB)", result["api_rss_peak_mib"]],
            ["API RSS after (MiB)", result["api_rss_after_mib"]],
            ["poll target", "GET " + result["poll_target"]],
            [
                "load",
                f"{result['rate']:g}/s open loop"
                if result["rate"]
                else f"{result['concurrency']} tasks, closed loop",
            ],
            [
                "server cores / client cores",
                f"{result['server_cpus'] or 'any'} / {result['client_cpus'] or 'any'}",
            ],
            ["poll requests", result["poll_requests"]],
            ["poll req/s", result["poll_rps"]],
            ["poll p50 (ms)", result["poll_p50_ms"]],
            ["poll p90 (ms)", result["poll_p90_ms"]],
            ["poll p99 (ms)", result["poll_p99_ms"]],
            ["poll errors", result["poll_errors"]],
            ["client CPU s (poll)", result["poll_client_cpu_s"]],
            ["server CPU s (poll)", result["poll_server_cpu_s"]],
            ["server CPU ms / request", result["server_cpu_ms_per_request"]],
        ],
    )
    save_json(args.json, result)


if __name__ == "__main__":
    main()
