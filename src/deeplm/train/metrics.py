"""Metrics sinks: one JSONL and one CSV file per phase, plus TensorBoard scalars.

Records are appended; on a resumed run, rows past the resume step are dropped first, so the
files always describe one consistent history.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

CSV_FIELDS = [
    "step", "tokens", "loss", "loss_unweighted", "lr", "grad_norm", "tokens_per_s", "mfu",
    "seq_len", "micro_batch", "frozen_layers", "val_loss", "val_ppl", "distinct_1",
    "distinct_2", "rare_token_rate", "elapsed_s",
]  # fmt: skip


class MetricsLogger:
    def __init__(
        self,
        metrics_dir: Path,
        phase: str,
        tensorboard_dir: Path | None = None,
        resume_step: int = 0,
    ):
        metrics_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = metrics_dir / f"{phase}.jsonl"
        self.csv_path = metrics_dir / f"{phase}.csv"
        self.phase = phase
        self._truncate_after(resume_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._csv_fh = open(self.csv_path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._csv = csv.DictWriter(self._csv_fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    log_dir=str(tensorboard_dir / phase),
                    purge_step=resume_step if resume_step > 0 else None,
                )
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` while logging (after a rollback); appends continue after."""
        self._jsonl.flush()
        self._csv_fh.flush()
        self._truncate_after(step)

    def _truncate_after(self, step: int) -> None:
        """Drop rows with step > ``step`` (they belong to work redone after a resume)."""
        if self.jsonl_path.exists():
            keep = []
            for line in self.jsonl_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash
                if rec.get("step", 0) <= step:
                    keep.append(line)
            self.jsonl_path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        if self.csv_path.exists():
            rows = list(csv.DictReader(self.csv_path.open(encoding="utf-8")))
            with self.csv_path.open("w", encoding="utf-8", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
                w.writeheader()
                for r in rows:
                    try:
                        if int(r.get("step") or 0) <= step:
                            w.writerow(r)
                    except ValueError:
                        continue

    def log(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._jsonl.write(json.dumps(clean, sort_keys=True) + "\n")
        self._jsonl.flush()
        self._csv.writerow(clean)
        self._csv_fh.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if (
                    isinstance(v, int | float)
                    and not isinstance(v, bool)
                    and k != "step"
                    and v is not None
                ):
                    self._tb.add_scalar(f"{k}", v, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        self._jsonl.close()
        self._csv_fh.close()
        if self._tb is not None:
            self._tb.close()


class NullMetrics:
    """The metrics sink of a process that writes no files (ranks other than 0)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_text(self, tag: str, text: str, step: int) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
