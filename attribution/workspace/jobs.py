"""Background jobs of a workspace (scoring the other steps, building a store) and the compute lock.

A :class:`JobRunner` runs each job in a named thread, at most one per key, and reports its
progress through a :class:`Job`. Jobs cooperate: their work checks :meth:`Job.check` between
units (a chunk of steps, a batch of rows) and stops there once the runner shuts down. The runner
shuts down before the interpreter does (``atexit``): a thread still inside torch while the
process exits aborts it ("terminate called without an active exception", exit code 134).

:class:`PriorityLock` serializes gradient computations on the shared models
(``torch.func.functional_call`` swaps a module's parameters while it runs, so two threads
differentiating one UNet at once corrupt each other's results), and lets what a user just
asked for go before background work: a background holder waits while a foreground request
is waiting, and gives the lock up at its next :meth:`PriorityLock.pause_point` (between two
gradient passes, inside a step) when one arrives. A session that is rendering a page marks
itself with :meth:`PriorityLock.foreground`; background work pauses at those points for it
too, since on a small machine a background thread doubles the time of every page run (the
two threads take turns on the interpreter lock).
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator

__all__ = ["Job", "JobCancelled", "JobRunner", "PriorityLock"]


class JobCancelled(Exception):
    """Raised inside a job's work by :meth:`Job.check` once its runner shuts down."""


@dataclass
class Job:
    """Progress of one background job: ``done`` of ``total`` units, and how it ended."""

    name: str
    done: int = 0
    total: int = 0
    error: str | None = None
    finished: bool = False
    stage: str = ""
    cancelled: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _rate_from: tuple[float, int] | None = field(default=None, repr=False)  # (time, done) of the first report

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def progress(self, done: int, total: int) -> None:
        """A progress callback for the job's work (also checks for shutdown)."""
        if self._rate_from is None:
            self._rate_from = (time.monotonic(), int(done))
        self.done, self.total = int(done), int(total)
        self.check()

    def seconds_left(self) -> float | None:
        """Time left at the rate measured since the first progress report (None before two reports)."""
        if self._rate_from is None or self.total <= 0:
            return None
        t0, d0 = self._rate_from
        if self.done <= d0:
            return None
        return (self.total - self.done) * (time.monotonic() - t0) / (self.done - d0)

    def cancel(self) -> None:
        """Ask the work to stop at its next check, as cancelled by the user (not a shutdown)."""
        self.cancelled = True
        self._stop.set()

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the job was cancelled or the runner is shutting down."""
        if self._stop.is_set():
            raise JobCancelled(self.name)


class JobRunner:
    """Named background threads, one per key, joined on :meth:`shutdown` and at interpreter exit."""

    def __init__(self) -> None:
        self._jobs: dict[Hashable, Job] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        ref = weakref.ref(self)
        atexit.register(lambda: (r := ref()) is not None and r.shutdown())

    def start(self, key: Hashable, name: str, work: Callable[[Job], None], total: int = 0) -> Job:
        """Run ``work(job)`` in a thread named ``name`` unless the job ``key`` is running; returns the job.

        ``work`` reports progress with ``job.progress(done, total)`` (or sets ``job.done``) and
        calls ``job.check()`` between units; an exception ends the job with ``job.error`` set.
        """
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.running:
                return job
            job = Job(name=name, total=total)
            if self._closed:
                job.error = "the workspace is shutting down"
                return job

            def run() -> None:
                self._local.job = job
                try:
                    work(job)
                    job.finished = True
                except JobCancelled:
                    pass
                except Exception as e:  # reported to the caller through the job
                    job.error = f"{type(e).__name__}: {e}"

            job.thread = threading.Thread(target=run, daemon=True, name=name)
            self._jobs[key] = job
            job.thread.start()
            return job

    def get(self, key: Hashable) -> Job | None:
        return self._jobs.get(key)

    def in_job(self) -> bool:
        """Whether the calling thread is one of this runner's jobs (background work)."""
        return getattr(self._local, "job", None) is not None

    def running(self) -> list[Job]:
        return [j for j in list(self._jobs.values()) if j.running]

    def shutdown(self, timeout: float = 60.0) -> None:
        """Ask every job to stop at its next check and wait for the threads (at most ``timeout`` s each)."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job._stop.set()
        for job in jobs:
            if job.thread is not None and job.thread is not threading.current_thread():
                job.thread.join(timeout)


class PriorityLock:
    """A mutex whose foreground requests go before background ones (see module doc).

    Foreground: a thread that :meth:`hold` s the lock with ``background=False``, or that runs
    inside :meth:`foreground` (a page being rendered). Background holders wait while any
    foreground is active, and release the lock at :meth:`pause_point` until none is, for at
    most ``max_pause`` seconds at a time, so that a stream of page runs cannot starve them.
    """

    def __init__(self, max_pause: float = 5.0) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting = 0  # foreground requests waiting for the lock
        self._active = 0  # foreground activities (page runs) in progress
        self._background_owner: int | None = None  # thread id of a background holder
        self.max_pause = max_pause
        self.pauses = 0  # times a background holder gave the lock up (for tests and benchmarks)

    def _foreground_idle(self) -> bool:
        return self._waiting == 0 and self._active == 0

    @contextmanager
    def foreground(self) -> Iterator[None]:
        """Mark the calling thread's work as what a user waits for: background work pauses meanwhile."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def _wait_for_foreground(self) -> None:
        with self._cond:
            self._cond.wait_for(self._foreground_idle, timeout=self.max_pause)

    @contextmanager
    def hold(self, background: bool) -> Iterator[None]:
        if background:
            while True:
                self._wait_for_foreground()
                if self._lock.acquire(timeout=0.05):
                    break
            self._background_owner = threading.get_ident()
        else:
            with self._cond:
                self._waiting += 1
            self._lock.acquire()
            with self._cond:
                self._waiting -= 1
                self._cond.notify_all()
        try:
            yield
        finally:
            if background:
                self._background_owner = None
            self._lock.release()

    def pause_point(self) -> None:
        """Called by background work between two units that need not run under one hold (e.g. the
        gradient passes of two checkpoints): when a foreground is active or waiting, release the
        lock, wait until it is done (at most ``max_pause`` s) and take the lock again. A no-op in
        any thread but the background holder's."""
        if self._background_owner != threading.get_ident():
            return
        with self._cond:
            if self._foreground_idle():
                return
        self.pauses += 1
        self._background_owner = None
        self._lock.release()
        try:
            self._wait_for_foreground()
        finally:
            while not self._lock.acquire(timeout=0.05):
                self._wait_for_foreground()
            self._background_owner = threading.get_ident()
