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
is waiting.
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
    """A mutex whose foreground requests go before background ones (see module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting = 0  # foreground requests waiting for the lock

    @contextmanager
    def hold(self, background: bool) -> Iterator[None]:
        if background:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._waiting == 0)
                if self._lock.acquire(timeout=0.05):
                    break
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
            self._lock.release()
