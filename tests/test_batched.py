"""Batched decoding (deeplm.model.batched) and the server's scheduler, on a small random model."""

from __future__ import annotations

import threading
import time

import torch

from deeplm.config import config_from_dict
from deeplm.model.batched import SlotCache, decode_step, prefill
from deeplm.model.generate import TextAssembler, generate
from deeplm.model.transformer import Transformer
from deeplm.serve.scheduler import Job, QueueFull, Scheduler
from tests.finished_run import one_thread
from tests.helpers import micro_config

PROMPTS = [[1, 5, 7], [1, 9, 8, 7, 6, 5, 2, 3], [1], [1] + list(range(20, 40))]


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = config_from_dict(micro_config()).model
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper logits than the init, so greedy tokens vary
        model.lm_head.weight.mul_(30)
    return model


def _greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([prompt]), n, temperature=0)[0, len(prompt) :].tolist()


def test_decode_step_equals_unbatched_greedy() -> None:
    model = _model()
    n = 16
    with one_thread():
        ref = [_greedy(model, p, n) for p in PROMPTS]
        cache = SlotCache(model, len(PROMPTS))
        out = [[int(prefill(model, cache, r, p).argmax())] for r, p in enumerate(PROMPTS)]
        for _ in range(n - 1):
            tokens = [o[-1] for o in out]
            positions = [len(p) + len(o) - 1 for p, o in zip(PROMPTS, out)]
            logits = decode_step(model, cache, tokens, positions)
            for o, row in zip(out, logits):
                o.append(int(row.argmax()))
    assert out == ref
    assert len({tuple(r) for r in ref}) > 1


def _job(prompt: list[int], max_new: int, events: list, tok=None, deadline: float = 60.0) -> Job:
    """A job whose text is decoded with ``tok`` (no stop tokens: it runs to ``max_new``)."""
    return Job(
        prompt=prompt,
        max_new=max_new,
        assembler=TextAssembler(tok, None, stop_token_ids=[]) if tok else None,  # type: ignore
        emit=events.append,
        deadline=time.monotonic() + deadline,
    )


def _wait(events: list[list], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(ev and ev[-1][0] in ("done", "error") for ev in events):
        assert time.monotonic() < deadline, events
        time.sleep(0.01)


def test_scheduler_batches_and_matches_greedy(corpus) -> None:
    model = _model()
    tok = corpus["tokenizer"]
    sched = Scheduler(model, max_batch=2, queue_size=8)  # 4 jobs: rows are reused
    events: list[list] = [[] for _ in PROMPTS]
    jobs = [_job(p, 5 + 3 * i, events[i], tok) for i, p in enumerate(PROMPTS)]
    sched.submit(jobs)  # queued before the worker starts: the first step is a batch of 2
    with one_thread():
        sched.start()
        try:
            _wait(events)
        finally:
            sched.stop()
        for job, ev in zip(jobs, events):
            assert job.tokens == _greedy(model, job.prompt, job.max_new)
            text = "".join(e[1] for e in ev if e[0] == "piece")
            assert ev[-1] == ("done", "length", job.max_new, text)
            assert text == tok.decode(job.tokens, skip_special_tokens=True)


def test_queue_bound_deadline_and_cancel() -> None:
    model = _model()
    sched = Scheduler(model, max_batch=1, queue_size=2)
    late: list = []
    cancelled: list = []
    sched.submit([_job([1, 2], 4, late, deadline=-1.0)])  # never started: no assembler
    gone = _job([1, 2], 50, cancelled)  # cancelled before it starts
    gone.cancel()
    sched.submit([gone])
    try:
        sched.submit([_job([1], 1, [])])
        raise AssertionError("the queue should be full")
    except QueueFull as exc:
        assert exc.retry_after >= 1
    with one_thread():
        sched.start()
        _wait([late])
        sched.stop()
    assert late[-1][0] == "error" and late[-1][1] == 503
    assert cancelled == []  # dropped without work
    assert not any(t.name == "deeplm-decode" and t.is_alive() for t in threading.enumerate())
