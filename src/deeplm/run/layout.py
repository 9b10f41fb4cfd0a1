"""The run directory's layout: the one module that knows where every file of a run lives, and
how to find a run's checkpoints (newest, phase-final, moved aside as corrupt).

Every other module asks :class:`RunLayout` for a path; none builds one from a literal name. The
names are the on-disk format: old run directories keep working because they never change.

::

    <run>/
      config.json                    the run's effective configuration (one run per directory)
      state.db (+ -wal, -shm)        the StateDB: stages, cursors, artifacts, phases, events
      .lock                          advisory lock of the process driving the run
      data/<phase>/<split>.jsonl     cleaned documents (``prepare``); split = train | val
      data/<phase>/parts/            per-source parts while ``prepare`` runs
      tokenizer/tokenizer.json       the byte-level BPE tokenizer (``tokenizer``)
      tokenizer/.import/             staging of ``deeplm import``
      shards/<phase>/<split>.bin     token stream (+ .idx.npy offsets, .json metadata)
      checkpoints/<i>-<phase>/step-NNNNNNN/   checkpoints (see :mod:`deeplm.run.checkpoint`)
      metrics/<phase>.jsonl, .csv    training metrics; <phase>.samples.jsonl: samples
      tensorboard/                   TensorBoard event files
      dist/<i>-<phase>/              launcher <-> ranks files of a distributed phase
                                     (config.json, STOP, result); dist/follow-node<N>.json
      report.md, report/             the pipeline's report (``evaluate``): eval.json, PNG plots
      eval/                          ``deeplm eval``'s default output (eval.json, report.md)
      temporal/                      a local Temporal dev server's state and the worker's log

``<i>`` is the phase's 1-based position in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deeplm.config import RunConfig
from deeplm.run import checkpoint as ckpt

CONFIG_FILE = "config.json"
STATE_FILE = "state.db"
LOCK_FILE = ".lock"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created or read by building one)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # accept a str too

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunLayout | None:
        """``<run>/checkpoints/<phase>/step-N`` -> the layout of ``<run>`` when that folder holds
        a run's config; None otherwise."""
        p = Path(checkpoint).resolve()
        if len(p.parents) >= 3 and cls(p.parents[2]).config.is_file():
            return cls(p.parents[2])
        return None

    # ------------------------------------------------------------------ run files

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def state_db(self) -> Path:
        return self.root / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    # ------------------------------------------------------------------ data

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def docs(self, phase: str, split: str) -> Path:
        """A phase's cleaned documents of one split (JSON lines ``{"text": ...}``)."""
        return self.data_dir / phase / f"{split}.jsonl"

    def doc_parts(self, phase: str) -> Path:
        """The folder of a phase's per-source parts while ``prepare`` runs."""
        return self.data_dir / phase / "parts"

    def doc_part(self, phase: str, source_idx: int, split: str) -> Path:
        """Source ``source_idx``'s cleaned documents of one split while ``prepare`` runs."""
        return self.doc_parts(phase) / f"{source_idx}.{split}.jsonl"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_dir / "tokenizer.json"

    @property
    def tokenizer_staging(self) -> Path:
        """Where ``deeplm import`` prepares the tokenizer before moving it into place."""
        return self.tokenizer_dir / ".import"

    @property
    def shards_root(self) -> Path:
        return self.root / "shards"

    def shards_dir(self, phase: str) -> Path:
        return self.shards_root / phase

    def shard(self, phase: str, split: str) -> Path:
        """A shard's prefix (``<prefix>.bin``, ``.idx.npy``, ``.json``)."""
        return self.shards_dir(phase) / split

    # ------------------------------------------------------------------ training

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def phase_checkpoints(self, phase_idx: int, phase: str) -> Path:
        """The checkpoint folder of phase ``phase_idx`` (0-based) named ``phase``."""
        return self.checkpoints_dir / f"{phase_idx + 1}-{phase}"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics(self, phase: str) -> Path:
        """A phase's metrics as JSON lines (the CSV beside it has the same stem)."""
        return self.metrics_dir / f"{phase}.jsonl"

    def samples(self, phase: str) -> Path:
        """The samples generated while a phase trains (JSON lines)."""
        return self.metrics_dir / f"{phase}.samples.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard"

    def dist_dir(self, phase_idx: int, phase: str) -> Path:
        """Small files between the distributed launcher and the ranks for one phase."""
        return self.root / "dist" / f"{phase_idx + 1}-{phase}"

    def dist_config(self, phase_idx: int, phase: str) -> Path:
        """The config the launcher hands the ranks of one distributed phase."""
        return self.dist_dir(phase_idx, phase) / CONFIG_FILE

    def follow_config(self, node_rank: int) -> Path:
        """The resolved config of a following node of a multi-node job."""
        return self.root / "dist" / f"follow-node{node_rank}.json"

    # ------------------------------------------------------------------ evaluation

    @property
    def report(self) -> Path:
        """The pipeline's report (``evaluate`` stage)."""
        return self.root / "report.md"

    @property
    def report_dir(self) -> Path:
        """The report's results (``eval.json``) and loss-curve PNGs."""
        return self.root / "report"

    @property
    def eval_dir(self) -> Path:
        """``deeplm eval``'s default output folder (leaves the pipeline's report alone)."""
        return self.root / "eval"

    @property
    def temporal_dir(self) -> Path:
        """A local Temporal dev server's state (and the worker's log) for this run."""
        return self.root / "temporal"

    @property
    def temporal_worker_log(self) -> Path:
        """The log of a worker that ``deeplm temporal start --with-worker`` runs."""
        return self.temporal_dir / "worker.log"

    # ------------------------------------------------------------------ checkpoint discovery

    def phase_dirs(self, cfg: RunConfig) -> list[Path]:
        """Every phase's checkpoint folder, in phase order."""
        return [self.phase_checkpoints(i, p.name) for i, p in enumerate(cfg.phases)]

    def final_checkpoint(self, cfg: RunConfig, phase_idx: int) -> Path | None:
        """Phase ``phase_idx``'s final checkpoint (None until the phase has finished)."""
        folder = self.phase_checkpoints(phase_idx, cfg.phases[phase_idx].name)
        latest = ckpt.latest_checkpoint(folder)
        if latest is not None and latest.meta.get("final"):
            return latest.path
        return None

    def final_checkpoints(self, cfg: RunConfig) -> dict[str, Path]:
        """The final checkpoint of every phase that has one, by phase name."""
        finals = {p.name: self.final_checkpoint(cfg, i) for i, p in enumerate(cfg.phases)}
        return {name: path for name, path in finals.items() if path is not None}

    def latest_checkpoint(self, cfg: RunConfig) -> Path | None:
        """The newest complete checkpoint of the latest phase that has one (corrupt ones are
        moved aside and skipped)."""
        for folder in reversed(self.phase_dirs(cfg)):
            latest = ckpt.latest_checkpoint(folder)
            if latest is not None:
                return latest.path
        return None

    def corrupt_checkpoint_warnings(self, cfg: RunConfig) -> list[str]:
        """One line per checkpoint moved aside as corrupted that is newer than every intact
        one, i.e. the model in use is older than the run got (one trained again since is no
        news)."""
        newest = (-1, -1)
        corrupt = []
        for i, folder in enumerate(self.phase_dirs(cfg)):
            for c in ckpt.list_checkpoints(folder):
                newest = max(newest, (i, c.step))
            for path, reason in ckpt.corrupt_checkpoints(folder):
                digits = path.name.removeprefix("step-").removesuffix(".corrupt")
                step = int(digits) if digits.isdigit() else 1 << 62
                corrupt.append(((i, step), path, reason))
        return [
            f"checkpoint {path} is corrupt and not used ({reason})"
            for key, path, reason in corrupt
            if key > newest
        ]
