"""The pipeline's plan: the ordered stages of a run, shared by every orchestrator (the local
driver and the Temporal workflow), and which stages consume which stage's outputs.

This module imports nothing heavy, so the Temporal workflow sandbox can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from deeplm.config import RunConfig


@dataclass(frozen=True)
class StageSpec:
    """One step of the pipeline: its StateDB name, stage function name and argument."""

    name: str
    activity: str
    arg: int | None = None
    queue: str = "cpu"


def pipeline_stages(cfg: RunConfig) -> list[StageSpec]:
    """The ordered stages of a run (shared by every orchestrator)."""
    stages = [StageSpec("prepare", "prepare"), StageSpec("tokenizer", "train_tokenizer")]
    stages += [StageSpec(f"tokenize:{p.name}", "tokenize", i) for i, p in enumerate(cfg.phases)]
    stages += [
        StageSpec(f"train:{p.name}", "train_phase", i, queue="gpu")
        for i, p in enumerate(cfg.phases)
    ]
    stages.append(StageSpec("evaluate", "evaluate", queue="gpu"))
    return stages


def downstream(cfg: RunConfig, stage: str) -> list[str]:
    """The stages whose inputs include ``stage``'s outputs (not ``stage`` itself)."""
    names = [s.name for s in pipeline_stages(cfg)]
    phases = [p.name for p in cfg.phases]
    if stage in ("prepare", "tokenizer"):
        return [n for n in names if n.startswith(("tokenizer", "tokenize:", "train:", "evaluate"))]
    if stage.startswith(("tokenize:", "train:")):
        i = phases.index(stage.split(":", 1)[1])
        return [f"train:{p}" for p in phases[i:] if f"train:{p}" != stage] + ["evaluate"]
    return []
