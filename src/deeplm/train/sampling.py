"""Samples during training: when to sample (at an evaluation that falls on ``sample_every``, and
at the phase's end), the short and long completions, their richness figures (``distinct_1``,
``distinct_2``, ``rare_token_rate`` with rare-token weighting) in the metrics, and the
``<phase>.samples.jsonl`` file.

Sampling draws from its own generator (seeded by the run's seed), never from the training RNG, so
exact resume is unaffected."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from deeplm.config import PhaseConfig, RunConfig
from deeplm.eval.richness import distinct_n
from deeplm.eval.samples import sample_texts
from deeplm.tokenizer import Tokenizer
from deeplm.train.metrics import MetricsLogger


class Sampler:
    """``should_sample(step, last)`` decides (asked after an evaluation); ``sample(model, step)``
    generates, logs and appends to ``samples_path``. ``rare_ids``: the token ids weighted above 1
    by rare-token weighting (None when it is off)."""

    def __init__(
        self,
        cfg: RunConfig,
        phase: PhaseConfig,
        tokenizer: Tokenizer,
        device: torch.device,
        metrics: MetricsLogger,
        samples_path: Path,
        rare_ids: set[int] | None,
    ):
        self.cfg = cfg
        self.phase = phase
        self.tokenizer = tokenizer
        self.device = device
        self.metrics = metrics
        self.samples_path = samples_path
        self.rare_ids = rare_ids
        self.samples: list[dict[str, str]] = []  # the latest samples

    def should_sample(self, step: int, last: bool) -> bool:
        """At the end, and at evaluations on multiples of ``sample_every`` (0: every one)."""
        every = self.phase.sample_every or self.phase.eval_every
        return last or bool(every and step % every == 0)

    def sample(self, model: nn.Module | None, step: int) -> list[dict[str, str]]:
        """Sample with ``model`` (None: this process does not sample, e.g. rank > 0)."""
        self.samples = [] if model is None else self._sample(model, step)
        return self.samples

    def _sample(self, model: nn.Module, step: int) -> list[dict[str, str]]:
        phase, finetune = self.phase, self.phase.kind == "finetune"
        samples = sample_texts(
            model,
            self.tokenizer,
            phase.prompts,
            phase.sample_tokens,
            self.device,
            seed=self.cfg.seed,
            allow_special=finetune,
        )
        for s in samples:
            s["kind"] = "short"
        if phase.long_sample_tokens:
            longs = sample_texts(
                model,
                self.tokenizer,
                phase.prompts[:1],
                min(phase.long_sample_tokens, self.cfg.model.max_seq_len - 8),
                self.device,
                seed=self.cfg.seed + 99,
                allow_special=finetune,
            )
            samples += [dict(s, kind="long") for s in longs]
        self._log(samples, step)
        return samples

    def _log(self, samples: list[dict[str, str]], step: int) -> None:
        texts = [s["completion"] for s in samples]
        # whitespace words, as the logged distinct_1/distinct_2 always were
        richness = {
            "distinct_1": distinct_n(texts, 1, str.split),
            "distinct_2": distinct_n(texts, 2, str.split),
        }
        if self.rare_ids is not None:
            ids = [t for text in texts for t in self.tokenizer.encode(text)]
            rare = self.rare_ids
            richness["rare_token_rate"] = sum(1 for t in ids if t in rare) / max(1, len(ids))
        self.metrics.log({"step": step, **richness})
        text = "\n\n".join(f"**{s['prompt']}**{s['completion']}" for s in samples)
        self.metrics.log_text("samples", text, step)
        with self.samples_path.open("a") as fh:
            for s in samples:
                fh.write(json.dumps({"step": step, **s}) + "\n")
