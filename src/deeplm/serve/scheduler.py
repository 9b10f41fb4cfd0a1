"""The server's generation engine: a bounded queue and one worker thread that decodes in batches.

Owns :class:`Job` (one sequence to generate, with its sampling parameters, random generator,
stop rules and a thread-safe ``emit`` callback) and :class:`Scheduler`:

* at most ``max_batch`` sequences are generated at a time, in one batch (continuous batching:
  a waiting sequence joins as soon as a row is free, a finished one leaves at once); each has
  its own KV-cache row (:mod:`deeplm.model.batched`);
* at most ``queue_size`` more wait; :meth:`Scheduler.submit` raises :class:`QueueFull` beyond
  that (the server answers 429 with ``Retry-After``), so work never piles up without bound;
* a sequence still waiting at its deadline is dropped with an error; one still generating at
  its deadline ends with ``finish_reason: "length"``;
* the model runs on this one thread only, so requests never share state.

Events sent through ``emit``: ``("piece", text)`` (only for a job with ``stream`` set),
``("done", finish_reason, n_tokens, text)`` or ``("error", status, message)``; ``done`` and
``error`` are final. Greedy rows take their token from one batched argmax.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deeplm.model.batched import SlotCache, decode_step, prefill
from deeplm.model.generate import TextAssembler, apply_repetition_penalty, sample_next
from deeplm.model.transformer import Transformer


class QueueFull(Exception):
    """The queue cannot take the sequences of a request now; try again later."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One sequence to generate (see the module docstring for ``emit``'s events)."""

    prompt: list[int]
    max_new: int
    assembler: TextAssembler
    emit: Callable[[tuple[Any, ...]], None]
    deadline: float
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None
    stream: bool = True  # emit text pieces as they come (else only the text at the end)
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    started: float = 0.0

    def cancel(self) -> None:
        """The client went away: the worker drops the sequence at its next step."""
        self.cancelled = True


class Scheduler:
    """A worker thread decoding up to ``max_batch`` sequences at a time from a bounded queue."""

    def __init__(self, model: Transformer, max_batch: int = 8, queue_size: int = 64) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.queue_size = queue_size
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._cache: SlotCache | None = None
        self._seconds_per_job = 1.0  # running estimate, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="deeplm-decode", daemon=True)

    # -------------------------------------------------------------- public API

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail waiting sequences (503), stop the worker after its current step."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for job in waiting:
            self._fail(job, 503, "the server is shutting down")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, jobs: list[Job]) -> None:
        """Queue every job of one request, or none (:class:`QueueFull`)."""
        with self._cond:
            if self._stopping:
                raise QueueFull(5)
            if len(self._waiting) + len(jobs) > self.queue_size:
                raise QueueFull(self._retry_after())
            self._waiting.extend(jobs)
            self._cond.notify()

    def load(self) -> dict[str, int]:
        """Sequences generating now and waiting (for ``/health``)."""
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    def _retry_after(self) -> int:
        backlog = (len(self._waiting) + len(self._active)) / self.max_batch
        return max(1, min(60, round(backlog * self._seconds_per_job)))

    # -------------------------------------------------------------- the worker

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait(0.5)
                if self._stopping:
                    break
                admitted = self._take_waiting()
            for job in admitted:
                self._guarded(self._start, job)
            if self._active:
                self._guarded(self._step)
        for job in self._active:
            self._fail(job, 503, "the server is shutting down")
        self._active = []

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a model call; on an error fail the active sequences and keep serving."""
        try:
            fn(*args)
        except Exception as exc:  # a model error (a bug, out of memory)
            for job in self._active:
                self._fail(job, 500, f"internal error: {type(exc).__name__}: {exc}")
            self._active = []

    def _take_waiting(self) -> list[Job]:
        out = []
        while self._waiting and len(self._active) + len(out) < self.max_batch:
            out.append(self._waiting.popleft())
        return out

    def _start(self, job: Job) -> None:
        if job.cancelled:
            return
        if time.monotonic() > job.deadline:
            self._fail(job, 503, "the request timed out waiting in the queue; retry later")
            return
        job.started = time.monotonic()
        if job.max_new <= 0:
            self._finish(job)
            return
        if self._cache is None:
            self._cache = SlotCache(self.model, self.max_batch)
        row = len(self._active)
        self._active.append(job)
        self._advance(job, prefill(self.model, self._cache, row, job.prompt))

    def _step(self) -> None:
        active = [j for j in self._active if not j.finished]
        if len(active) != len(self._active):
            self._compact()
            active = self._active
        if not active:
            return
        tokens = [j.tokens[-1] for j in active]
        positions = [len(j.prompt) + len(j.tokens) - 1 for j in active]
        assert self._cache is not None
        logits = decode_step(self.model, self._cache, tokens, positions)
        greedy = logits.argmax(dim=-1).tolist()
        for job, row, best in zip(active, logits, greedy, strict=True):
            self._advance(job, row, best)
        self._compact()

    def _compact(self) -> None:
        """Drop finished sequences; the last rows move into the freed ones."""
        assert self._cache is not None
        i = 0
        while i < len(self._active):
            if self._active[i].finished:
                last = len(self._active) - 1
                self._cache.move(last, i)
                self._active[i] = self._active[last]
                self._active.pop()
            else:
                i += 1

    def _advance(self, job: Job, logits: torch.Tensor, best: int | None = None) -> None:
        """Choose the next token of ``job`` from its ``logits`` ``[V]`` (``best``: their argmax,
        when known); emit text; maybe end."""
        job.tokens.append(self._choose(job, logits, best))
        piece = job.assembler.feed(job.tokens[-1])
        if piece and job.stream:
            self._emit(job, ("piece", piece))
        out_of_time = time.monotonic() > job.deadline
        if job.assembler.done or len(job.tokens) >= job.max_new or job.cancelled or out_of_time:
            self._finish(job)

    @staticmethod
    def _choose(job: Job, logits: torch.Tensor, best: int | None) -> int:
        if job.temperature == 0 and job.repetition_penalty == 1.0 and best is not None:
            return best  # what sample_next's argmax gives
        last = logits[None]
        if job.repetition_penalty != 1.0:
            context = torch.tensor([job.prompt + job.tokens], device=last.device)
            last = apply_repetition_penalty(last, context, job.repetition_penalty)
        return int(sample_next(last, job.temperature, job.top_k, job.top_p, job.generator)[0])

    def _finish(self, job: Job) -> None:
        piece = job.assembler.finish()
        if piece and job.stream:
            self._emit(job, ("piece", piece))
        job.finished = True
        took = time.monotonic() - (job.started or time.monotonic())
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * took
        reason = job.assembler.finish_reason or "length"
        self._emit(job, ("done", reason, len(job.tokens), job.assembler.text))

    def _fail(self, job: Job, status: int, message: str) -> None:
        job.finished = True
        self._emit(job, ("error", status, message))

    @staticmethod
    def _emit(job: Job, event: tuple[Any, ...]) -> None:
        try:
            job.emit(event)
        except RuntimeError:  # the request's event loop is gone (shutdown)
            job.cancel()
