"""Scale-out: split a step's jobs across processes and exchange only small per-job results.

ES needs no gradient all-reduce (EGGROLL, arXiv 2511.16652, Sec. 4): every process regenerates
the same noise, evaluates its share of the (member, prompt) jobs, and the processes exchange the
rewards of those jobs (scalars, plus completion lengths and texts for logging). Every process then
shapes the same fitness and applies the same update, so weights stay identical without any
broadcast.

Bit-identical results for any number of processes come from a fixed unit of work: the jobs of a
step are cut into chunks of ``chunk_size`` jobs in one global order, and chunk ``c`` runs on
process ``c % world_size``, as one batch. One process runs the same chunks one after another, so
every job sees the same batch shapes and the same numbers.
"""
from __future__ import annotations

import atexit
import os
import warnings

import torch


def job_chunks(num_jobs: int, chunk_size: int) -> list[range]:
    """Global, process-independent chunks of job indices.

    >>> [list(c) for c in job_chunks(5, 2)]
    [[0, 1], [2, 3], [4]]
    """
    return [range(s, min(s + chunk_size, num_jobs)) for s in range(0, num_jobs, chunk_size)]


def local_chunks(num_jobs: int, chunk_size: int, world_size: int, rank: int) -> list[range]:
    """The chunks process ``rank`` runs (round robin).

    >>> [list(c) for c in local_chunks(6, 2, world_size=2, rank=1)]
    [[2, 3]]
    """
    return job_chunks(num_jobs, chunk_size)[rank::world_size]


def gather_objects(obj, world_size: int) -> list:
    """Every process's ``obj``, in rank order (a list of one on a single process)."""
    if world_size == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def raise_first_error(results: list[dict]) -> None:
    """If any process failed (``{"error": message}``), raise it on every process, so all of them stop
    with the same message instead of waiting for the failed one."""
    for rank, r in enumerate(results):
        if r.get("error"):
            raise RuntimeError(f"[rank {rank}] {r['error']}")


def check_replicas_equal(value: float, world_size: int, what: str = "weights checksum") -> None:
    """Debug check: ``value`` must be the same on every process."""
    values = gather_objects(float(value), world_size)
    if len(set(values)) > 1:
        raise RuntimeError(f"{what} differs across processes: {values}")


def _alone_under_accelerate_cpu(env) -> bool:
    """Launched by ``accelerate launch --cpu`` and told it is the only process."""
    return env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and int(env.get("WORLD_SIZE", "1")) <= 1


def requested_cpu_processes(env: dict, launcher_argv: list[str]) -> int | None:
    """How many processes ``accelerate launch --cpu --num_processes N`` asked for, when it started one.

    That launcher starts a single process and tells it nothing of N; the only trace is the
    launcher's own command line (the parent process). Returns N > 1 in that case, else None.

    >>> requested_cpu_processes({"ACCELERATE_USE_CPU": "True"}, ["accelerate", "launch", "--cpu", "--num_processes", "2"])
    2
    >>> requested_cpu_processes({"ACCELERATE_USE_CPU": "True", "WORLD_SIZE": "2"}, ["accelerate", "--num_processes=2"])
    """
    if not _alone_under_accelerate_cpu(env):
        return None
    for i, arg in enumerate(launcher_argv):
        for flag in ("--num_processes", "--num-processes"):
            value = arg[len(flag) + 1:] if arg.startswith(flag + "=") else (
                launcher_argv[i + 1] if arg == flag and i + 1 < len(launcher_argv) else None)
            if value is not None and value.isdigit() and int(value) > 1:
                return int(value)
    return None


def warn_if_cpu_multiprocess_ignored() -> bool:
    """``accelerate launch --cpu --num_processes K`` silently starts ONE process. Detect and warn.

    Reads the launcher's command line (Linux ``/proc``); where it cannot be read or names no
    ``--num_processes``, a rendezvous port without a world size is taken as the sign. Returns True
    when the case was detected.
    """
    env = dict(os.environ)
    if not _alone_under_accelerate_cpu(env):
        return False
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    named = any(a.startswith(("--num_processes", "--num-processes")) for a in argv)
    asked = requested_cpu_processes(env, argv) if named else None
    if asked or (not named and "MASTER_PORT" in env):
        warnings.warn(f"`accelerate launch --cpu --num_processes {asked or 'K'}` starts only one process. For several "
                      "CPU processes over gloo use `accelerate launch --multi_gpu --num_processes K` (works without "
                      "GPUs; recipes/accelerate_configs/cpu_2proc.yaml) or `torchrun --nproc_per_node K`.",
                      stacklevel=2)
        return True
    return False


def default_chunk_size(num_jobs: int, world_size: int, max_sequences_in_flight: int | None) -> int:
    """``max_sequences_in_flight`` when set (then results do not depend on the process count), else an
    even split of the step's jobs over the processes."""
    if max_sequences_in_flight:
        return int(max_sequences_in_flight)
    return max(1, -(-num_jobs // world_size))


def stack_rows(rows: list[torch.Tensor], order: list[int], total: int, width: int) -> torch.Tensor:
    """Put per-job rows gathered from processes back in global job order."""
    out = torch.full((total, width), float("nan"))
    for idx, row in zip(order, rows):
        out[idx] = row
    return out


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_exit_handler_registered = False


def destroy_process_group_at_exit() -> bool:
    """Destroy torch.distributed's process groups when the interpreter exits, while it is still whole.

    A process that exits with a gloo group alive can abort after its work is done (SIGABRT,
    "terminate called without an active exception"): gloo's worker threads release tensors during
    interpreter finalization (pytorch/pytorch#179291). PyTorch's docs ask scripts to call
    ``destroy_process_group()`` at the end; TRL-style scripts do not. Registered once (returns True
    then); a no-op at exit when the group is already gone.
    """
    global _exit_handler_registered
    if _exit_handler_registered:
        return False
    atexit.register(_destroy_process_group)
    _exit_handler_registered = True
    return True
