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

``run_sharded`` is the whole exchange (chunks, errors relayed to every rank, gather in job order);
the trainer's one rollout, for training steps and evaluation alike, goes through it. This module
knows nothing of models or rewards: it moves lists of per-job values.
"""
from __future__ import annotations

import atexit


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


def run_sharded(num_jobs: int, chunk_size: int, fn, world_size: int, rank: int) -> tuple[dict[str, list], list]:
    """Run ``fn`` on this process's chunks of ``num_jobs`` jobs; every process gets every job's results.

    ``fn(chunks)`` receives this process's chunks (``local_chunks``: ranges of job indices) and
    returns ``(columns, summary)``: ``columns`` maps names to lists with one entry per job of those
    chunks, in chunk order; ``summary`` is any small picklable object. One exchange later, every
    process holds ``(columns, summaries)``: each column over all ``num_jobs`` jobs in global job
    order (``None`` for jobs whose process produced no such column) and the summaries in rank order.

    An exception in ``fn`` on any process is raised on every process (``RuntimeError`` naming the
    rank), so none waits for the failed one; on a single process it propagates unchanged.

    >>> run_sharded(3, 2, lambda chunks: ({"double": [2 * j for c in chunks for j in c]}, "done"), 1, 0)
    ({'double': [0, 2, 4]}, ['done'])
    """
    chunks = local_chunks(num_jobs, chunk_size, world_size, rank)
    jobs = [j for c in chunks for j in c]
    try:
        columns, summary = fn(chunks)
        for name, values in columns.items():
            if len(values) != len(jobs):
                raise ValueError(f"column {name!r} has {len(values)} entries for this process's {len(jobs)} jobs")
        result = {"jobs": jobs, "columns": columns, "summary": summary}
    except Exception as e:
        if world_size == 1:
            raise
        result = {"error": f"{type(e).__name__}: {e}"}  # every rank raises it after the gather below
    results = gather_objects(result, world_size)
    raise_first_error(results)
    names = list(dict.fromkeys(name for r in results for name in r["columns"]))
    out = {name: [None] * num_jobs for name in names}
    for r in results:
        for name, values in r["columns"].items():
            column = out[name]
            for j, v in zip(r["jobs"], values):
                column[j] = v
    return out, [r["summary"] for r in results]


def check_replicas_equal(value: float, world_size: int, what: str = "weights checksum") -> None:
    """Debug check: ``value`` must be the same on every process."""
    values = gather_objects(float(value), world_size)
    if len(set(values)) > 1:
        raise RuntimeError(f"{what} differs across processes: {values}")


def default_chunk_size(num_jobs: int, world_size: int, max_sequences_in_flight: int | None) -> int:
    """``max_sequences_in_flight`` when set (then results do not depend on the process count), else an
    even split of the step's jobs over the processes."""
    if max_sequences_in_flight:
        return int(max_sequences_in_flight)
    return max(1, -(-num_jobs // world_size))


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
