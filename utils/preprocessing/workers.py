"""The process pool of a preprocessing run, built so that no worker outlives the run (see :func:`_worker_init`)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any

from utils.preprocessing.summary import FileReport

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def _limit_threads() -> None:
    """One thread per worker: the parallelism is over files."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except (ImportError, ValueError):  # no numba, or its pool already started: threads stay as they are
        pass


#: Seconds between two checks of the worker watchdog (a worker outlives a killed run by at most about this).
WATCHDOG_INTERVAL_S = 0.2


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, i.e. dead but not yet reaped by its own parent, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X", b"x")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (not Linux): existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _watch_parent(parent_pid: int) -> None:
    while _process_alive(parent_pid):
        time.sleep(WATCHDOG_INTERVAL_S)
    os._exit(1)  # the run is gone: nobody will read this worker's result; atomic writes leave only complete files


def _set_parent_death_signal() -> bool:
    """Linux: SIGKILL this process when its parent exits. Returns whether the kernel took the request."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


#: Environment variable that :func:`run_in_pool` sets to its own pid while the forkserver starts, so the server can
#: tell that it is a preprocessing run's server (see :func:`_guard_forkserver`).
_RUN_PID_VAR = "PREPROCESSING_RUN_PID"

#: In a guarded forkserver: its own pid, read by the fork hook in each child it forks; ``None`` everywhere else.
_SERVER_PID: int | None = None


def _die_with_server_after_fork() -> None:
    """Fork hook of a guarded forkserver, run in the new child before anything else: die when the server dies.

    Why here and not only in :func:`_worker_init`: between the fork and the initializer a worker still unpickles its
    process object and imports the run's main script, which takes seconds on a loaded machine (or as long as that
    script makes it); a run killed in that window left the worker alive until it got to its watchdog. The kernel only
    signals a parent death that happens after ``prctl``, so the parent is checked again right after it.
    """
    global _SERVER_PID
    server, _SERVER_PID = _SERVER_PID, None  # a worker's own children (e.g. os.fork in a library) are not ours
    if server is None or not _set_parent_death_signal():
        return
    if os.getppid() != server:  # the server died before prctl: this child is already an orphan
        os._exit(1)


def _guard_forkserver() -> None:
    """In a forkserver started by :func:`run_in_pool` (it imports this module first, as a preload): die with the run.

    Why: left to itself the forkserver exits only once every process holding its "alive" pipe (the run and each
    worker) is gone, and then runs a full interpreter shutdown (the final garbage collection of torch and the
    pipeline takes seconds of CPU: measured 2-6 s after its last worker on a loaded 2-core machine), so it outlived a
    killed run by a time that grows with the load. Tied to the run by ``PR_SET_PDEATHSIG`` it is SIGKILLed with the
    run, and every worker it forked (tied to it from its first instruction by :func:`_die_with_server_after_fork`)
    with it, by the kernel: no survivor depends on how fast a loaded machine schedules it. Elsewhere (the run itself,
    other programs) this does nothing. Note: Linux signals the death of the *thread* that started the server, so a
    run from a thread that ends before the process kills its server; multiprocessing starts a new one at the next
    pool.
    """
    global _SERVER_PID
    run_pid = os.environ.get(_RUN_PID_VAR)
    if run_pid is None or run_pid != str(os.getppid()) or not _set_parent_death_signal():
        return
    if os.getppid() != int(run_pid):  # the run died before prctl
        os._exit(1)
    _SERVER_PID = os.getpid()
    os.register_at_fork(after_in_child=_die_with_server_after_fork)


_guard_forkserver()


def _worker_init(parent_pid: int) -> None:
    """Initializer of every pool worker: one thread, and die with the run.

    Why: a ``ProcessPoolExecutor`` worker waits on a queue whose write end every worker also holds, so when the run is
    killed it never sees end-of-file and waits forever, and while it lives the forkserver (which waits for all its
    clients to go) lives too. So each worker watches the run's pid (a thread, :data:`WATCHDOG_INTERVAL_S`) and exits
    when it is gone; the kernel also kills it if the forkserver dies first (``PR_SET_PDEATHSIG``, set at fork time when
    the server is guarded, see :func:`_guard_forkserver`, and again here for a server started elsewhere). Ctrl-C
    reaches the whole process group: workers ignore SIGINT and the parent's handler stops them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal()
    if not _process_alive(parent_pid):  # killed before this worker got here: the watchdog would only say so later
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watchdog").start()
    _limit_threads()


@contextlib.contextmanager
def _stop_workers_on_signal(pool: ProcessPoolExecutor) -> Iterator[None]:
    """While the pool runs, SIGTERM/SIGINT terminate its workers and end the run at once (exit 128 + signal).

    Why not let the exception unwind: leaving the ``with ProcessPoolExecutor`` block waits for every running file to
    finish. Finished slices are on disk (atomic writes): a rerun resumes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        procs = list(getattr(pool, "_processes", {}).values())
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.join(2.0)
                if proc.is_alive():
                    proc.kill()
        print(f"\ninterrupted by {signal.Signals(signum).name}: stopped {len(procs)} worker(s); finished slices are "
              "kept, rerun the same command to resume", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def run_in_pool(
    jobs: Sequence[tuple[str, Callable[..., FileReport], tuple]],
    num_workers: int,
    desc: str,
    show_progress: bool = True,
) -> list[FileReport]:
    """Run ``fn(*args)`` for every job (in this process, or a process pool); collect reports.

    A worker that dies (e.g. killed by the OS) is reported as a failure of its job rather than ending the run. Killing
    the run (SIGKILL, SIGTERM, Ctrl-C) leaves no process behind: see :func:`_worker_init` and
    :func:`_stop_workers_on_signal`.
    """
    from tqdm.auto import tqdm

    reports: list[FileReport] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="file", disable=not show_progress)
    if num_workers == 1 or len(jobs) <= 1:
        for name, fn, args in jobs:
            reports.append(fn(*args))
            bar.update(1)
    else:
        # forkserver: workers fork from a clean server that imported the pipeline once (fork from a process whose
        # OpenMP/torch threads already ran is unsafe; spawn would import torch once per worker). This module is
        # preloaded first: importing it ties the server, and every worker it forks, to this run (_guard_forkserver).
        ctx = multiprocessing.get_context("forkserver")
        preload = {fn.__module__ for _, fn, _ in jobs if fn.__module__ != "__main__"}
        preload |= {"utils.preprocessing.slices", "utils.fastmri_io"}
        ctx.set_forkserver_preload([__name__, *sorted(preload - {__name__})])
        # The server inherits the environment when it starts (at the first submit): one BLAS/OpenMP thread, fixed at
        # library load time, and the run's pid for the guard.
        saved = {v: os.environ.get(v) for v in (*_THREAD_VARS, _RUN_PID_VAR)}
        os.environ.update({v: "1" for v in _THREAD_VARS})
        os.environ[_RUN_PID_VAR] = str(os.getpid())
        try:
            with ProcessPoolExecutor(
                max_workers=num_workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
            ) as pool, _stop_workers_on_signal(pool):
                futures: dict[Future, str] = {pool.submit(fn, *args): name for name, fn, args in jobs}
                for fut in as_completed(futures):
                    try:
                        reports.append(fut.result())
                    except Exception as exc:  # BrokenProcessPool and the like
                        err = f"worker failed: {type(exc).__name__}: {exc}"
                        reports.append(FileReport(name=futures[fut], error=err))
                    bar.update(1)
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
    bar.close()
    return reports
