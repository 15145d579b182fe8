"""Decode workers: processes that die with their parent, and in-order results with a per-file timeout.

A file whose read or decode takes longer than ``DecodeJob.timeout`` (a stalled network
mount, a decoder stuck in a loop) is recorded as failed and its worker is killed: a
ProcessPoolExecutor cannot kill one worker, so every worker is killed and the pool
started again, and the files that were in flight are decoded again. A worker that
dies (a decoder segfault) is handled the same way, and the file that killed it is
found by decoding the files in flight one at a time. Nothing here imports torch.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from indexer.reader import Decoded, DecodeJob, FileInfo, decode_file, warm_up

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Worker initializer: this process ends when ``parent`` does, even by SIGKILL.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) (it fires when the *thread* that started the
    worker ends; workers are started by the thread that submits, which outlives the pool).
    Elsewhere (macOS): a daemon thread polls os.getppid() every second.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C (sent to the whole terminal group) is the parent's to handle
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class DecodePool:
    """Spawned decode processes (not forked: no copy of a process holding torch's thread pools) that die with this one."""

    def __init__(self, workers: int):
        self.workers = workers
        self.restarts = 0
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))
        self._warm = [pool.submit(warm_up) for _ in range(self.workers)]  # start-up overlaps what the caller does next
        return pool

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def restart(self) -> None:
        """Kill every worker (one is stuck or dead) and start new ones, waiting until they are up.
        Futures not done yet fail with BrokenProcessPool."""
        processes = list((self._pool._processes or {}).values())  # no public way to kill a worker
        for p in processes:
            p.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.join(5)
        self.restarts += 1
        self._pool = self._start()
        self.ready()

    def ready(self) -> None:
        """Wait until the workers have started, so no file's timeout counts their start-up."""
        for f in self._warm:
            f.result(timeout=300)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def start_pool(workers: int) -> DecodePool | None:
    """Decode processes, started now so their start-up overlaps the scan (None: decode in-process)."""
    return DecodePool(workers) if workers > 0 else None


def timed_out(f: FileInfo, job: DecodeJob) -> Decoded:
    log.warning("gave up on %s after %g s", f.path, job.timeout)
    return Decoded(f.path, f.size, f.mtime_ns,
                   error=f"gave up after {job.timeout:g} s: reading or decoding took too long (stalled disk or network mount?)")


def decode_in_thread(f: FileInfo, job: DecodeJob) -> Decoded:
    """decode_file in this process with the job's timeout: a stuck read is left behind in a daemon thread."""
    out: list = []

    def run() -> None:
        try:
            out.append(decode_file(f, job))
        except BaseException as e:  # handed to the caller
            out.append(e)

    t = threading.Thread(target=run, name="decode", daemon=True)
    t.start()
    t.join(job.timeout)
    if t.is_alive():
        return timed_out(f, job)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def decoded_in_order(files: list[FileInfo], job: DecodeJob, pool: DecodePool | None, window: int) -> Iterator[Decoded]:
    """Decode files in worker processes, yielding results in input order with at most ``window`` in flight.

    Waiting starts on a file when every earlier one is done, so it is already running
    in a worker: the timeout measures its own read and decode."""
    if pool is None:
        for f in files:
            yield decode_in_thread(f, job)
        return
    if files:
        pool.ready()
    todo = collections.deque(files)
    pending: collections.deque[tuple[FileInfo, Future]] = collections.deque()
    isolate = 0  # after a worker died: decode this many files one at a time to find the one that kills it
    try:
        while todo or pending:
            while todo and len(pending) < (1 if isolate else window):
                f = todo.popleft()
                pending.append((f, pool.submit(decode_file, f, job)))
            f, fut = pending[0]
            try:
                d = fut.result(timeout=job.timeout)
            except (FutureTimeout, BrokenProcessPool) as e:
                stuck = isinstance(e, FutureTimeout)
                if not stuck and not isolate:  # some file in flight killed its worker: find which, one at a time
                    isolate = len(pending)
                    todo.extendleft(reversed([g for g, _ in pending]))
                    pending.clear()
                    pool.restart()
                    continue
                pending.popleft()
                todo.extendleft(reversed([g for g, _ in pending]))
                pending.clear()
                pool.restart()
                d = timed_out(f, job) if stuck else Decoded(
                    f.path, f.size, f.mtime_ns, error="the decoder crashed on this file (its worker process died)")
                if not stuck:
                    log.warning("decoding %s killed its worker", f.path)
            else:
                pending.popleft()
            isolate = max(0, isolate - 1)
            yield d
    finally:
        for _, p in pending:
            p.cancel()
