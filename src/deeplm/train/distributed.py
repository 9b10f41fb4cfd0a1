"""Data-parallel training with PyTorch's own engine: ``torchrun`` + DDP (default) or FSDP2.

Process group: :func:`init_distributed` reads the variables ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the group with
``nccl`` on CUDA and ``gloo`` elsewhere; :func:`torchrun_command` builds the launcher command
(``NCCL_NVLS_ENABLE=0`` is set in its environment by :func:`launch_env`).

Batch semantics ("without changing their configs"): the tokens of one optimizer step stay
``seq_len * micro_batch * grad_accum`` whatever the world size ``W``, so ``total_steps``, the LR
schedule and the token budget do not move. The step is split over the ranks:

- when ``W`` divides ``grad_accum``, every rank keeps the configured ``micro_batch`` (the size
  that fits one device) and runs ``grad_accum / W`` micro-batches;
- otherwise, when ``W`` divides ``micro_batch``, every rank runs ``grad_accum`` micro-batches of
  ``micro_batch / W`` windows;
- otherwise the configuration is rejected (:class:`DistributedConfigError`).

The loader (:class:`~deeplm.data.loader.PackedBatches` with ``rank``/``world_size``) reads the
same stream of windows as one process and hands rank ``r`` the ``r``-th slice, so one optimizer
step sees exactly the windows a single process would, and the loader state at a step boundary is
identical. Gradients are averaged over ranks once per optimizer step (DDP ``no_sync`` / FSDP2
``set_requires_gradient_sync(False)`` on all but the last micro-batch), which gives the same
update as one process up to floating-point summation order.

Checkpoints keep the single-process format: rank 0 writes ``model.safetensors`` (FSDP2: after
gathering the full state dict) and an optimizer state dict keyed by parameter index, exactly what
``torch.optim.Optimizer.state_dict()`` gives one process, with barriers around the write. Every
rank resumes from the same checkpoint, so a checkpoint written by W processes resumes in any
other number of processes (same global batch) and vice versa.

Rank 0 alone logs metrics, shows progress, samples and writes files; every rank evaluates (an
FSDP2 forward needs all ranks) and rank 0's value is broadcast, so early-stop decisions agree.
Stop requests are decided on rank 0 and broadcast, so all ranks stop at the same step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel as DDP

from deeplm.atomic import atomic_write_text
from deeplm.config import PhaseConfig, RunConfig, TrainConfig, config_to_json
from deeplm.data.shards import Shard
from deeplm.device import select_device
from deeplm.model import Transformer
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import RunLayout
from deeplm.tokenizer import Tokenizer
from deeplm.train.hooks import TrainHooks
from deeplm.train.parallel import LossFn, Parallel
from deeplm.train.trainer import PhaseOutcome, PhaseTrainer

# Lines the rank-0 worker prints for the launching process (progress, events): prefix + JSON.
EVENT_PREFIX = "@@deeplm-dist "
STOP_FILE = "STOP"  # in the phase's dist folder: the launcher asks the ranks to stop
RESULT_FILE = "result.json"  # in the phase's dist folder: rank 0's PhaseOutcome


class DistributedConfigError(ValueError):
    """The configuration cannot be split over this many processes."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------- process group


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the same variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    )


def env_from_environ() -> DistEnv:
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def current_env() -> DistEnv:
    """This process's place in the initialised group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistEnv()


def init_distributed(device_pref: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes; return this rank's place and device.

    CUDA (``auto`` or ``cuda`` with GPUs present): ``nccl`` and ``cuda:LOCAL_RANK``. Otherwise
    ``gloo`` on the device :func:`~deeplm.device.select_device` picks (CPU in practice).
    Idempotent: an already initialised group is reused.
    """
    env = env_from_environ()
    use_cuda = device_pref in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        select_device(device_pref)  # tf32 settings
    else:
        device = select_device(device_pref)
    if env.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, **kwargs)
    return env, device


def teardown(finished: bool = True) -> None:
    """Leave the process group (no-op without one).

    ``finished``: every rank got here after the same last collective, so they meet at a barrier
    first and none closes its connections while a peer still uses them (gloo aborts the peer,
    "Connection closed by peer", when that happens). After a failure there is no barrier: the
    peers may be gone, and torchrun stops the job anyway.
    """
    if dist.is_available() and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (so all ranks take the same branch)."""
    if not is_dist():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_float(value: float) -> float:
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=0)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` itself is not modified)."""
    if not is_dist():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


# ---------------------------------------------------------------------------- launching


def world_size_of(train: TrainConfig) -> int:
    return train.devices * train.nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for torchrun: the caller's, plus NVLink multicast off and one OpenMP
    thread per rank unless set (torchrun's own default, stated explicitly)."""
    env = dict(os.environ if base is None else base)
    env["NCCL_NVLS_ENABLE"] = "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def torchrun_command(
    train: TrainConfig, module_args: list[str], module: str = "deeplm.train.distributed_main"
) -> list[str]:
    """``python -m torch.distributed.run ... -m <module> <args>`` for ``train``'s topology.

    One node: a free local port (standalone). Several nodes: a static rendezvous at
    ``train.rdzv_endpoint`` (``host:port`` of node 0) with ``--node-rank train.node_rank``;
    every node runs the same command with its own ``node_rank``.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={train.devices}"]
    if train.nodes > 1:
        host, _, port = train.rdzv_endpoint.rpartition(":")
        cmd += [
            f"--nnodes={train.nodes}",
            f"--node-rank={train.node_rank}",
            f"--master-addr={host}",
            f"--master-port={port}",
        ]
    else:
        cmd += ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return cmd + ["-m", module, *module_args]


def dist_dir(run_dir: Path, phase_idx: int, phase: PhaseConfig) -> Path:
    """Small files between the launcher and the ranks (stop request, result) for one phase."""
    return RunLayout(run_dir).dist_dir(phase_idx, phase.name)


def emit(kind: str, payload: dict[str, Any]) -> None:
    """Rank 0 → launcher: one marked JSON line on stdout."""
    print(EVENT_PREFIX + json.dumps({"kind": kind, **payload}, default=str), flush=True)


def parse_event(line: str) -> dict[str, Any] | None:
    i = line.find(EVENT_PREFIX)
    if i < 0:
        return None
    try:
        return json.loads(line[i + len(EVENT_PREFIX) :])
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------------------- batch split


@dataclass
class _RankPhase(PhaseConfig):
    """A phase as one rank runs it: ``grad_accum`` is the rank's share, while the step's tokens
    (hence ``total_steps`` and the schedule) stay those of the configured phase."""

    global_grad_accum: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch * self.global_grad_accum


def split_batch(phase: PhaseConfig, world: int) -> tuple[int, int]:
    """(micro-batches per rank per step, windows per rank per micro-batch divisor): see the
    module doc. Returns ``(grad_accum_per_rank, micro_batch_divisor)``."""
    if world == 1:
        return phase.grad_accum, 1
    if phase.grad_accum % world == 0:
        return phase.grad_accum // world, 1
    smallest = min(phase.micro_batch_at(s) for s in range(0, phase.total_steps))
    if phase.micro_batch % world == 0 and smallest % world == 0:
        return phase.grad_accum, world
    raise DistributedConfigError(
        f"phase {phase.name!r}: {world} processes must divide grad_accum ({phase.grad_accum}) or "
        f"micro_batch ({phase.micro_batch}) so that one optimizer step keeps its "
        f"{phase.tokens_per_step} tokens"
    )


# ---------------------------------------------------------------------------- parallelize


class DataParallel(Parallel):
    """What a torchrun job (DDP or FSDP2) changes in :class:`PhaseTrainer` (see the module doc
    and :class:`~deeplm.train.parallel.Parallel`): the phase split over the ranks, the model
    wrapped (DDP, rebuilt when the frozen layers change) or sharded (FSDP2), gradients
    synchronised on a step's last micro-batch, losses averaged and evaluations broadcast, rank 0
    alone reporting, sampling and writing checkpoints in the single-process format."""

    distributed = True

    def __init__(self, env: DistEnv, mode: str):
        self.env = env
        self.mode = mode
        self.is_main = env.is_main
        self.rank = env.rank
        self.world_size = env.world_size
        self.micro_div = 1
        self._device = torch.device("cpu")
        self._wrapped: nn.Module | None = None
        self._wrapped_key: tuple[int, int] | None = None
        self._plain: Transformer | None = None

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp2" and self.world_size > 1

    # -------------------------------------------------------------- the phase and its data

    def rank_phase(self, phase: PhaseConfig) -> PhaseConfig:
        if self.mode == "fsdp2" and phase.lora_rank > 0:
            raise DistributedConfigError(
                f"phase {phase.name!r}: LoRA is not supported with train.parallel = 'fsdp2'"
                " (the adapters are small: use 'ddp')"
            )
        ga, self.micro_div = split_batch(phase, self.world_size)
        if ga == phase.grad_accum:
            return phase
        values = {f.name: getattr(phase, f.name) for f in dataclasses.fields(phase)}
        values["grad_accum"] = ga
        return _RankPhase(**values, global_grad_accum=phase.grad_accum)

    def loader_args(self, micro_batch: int) -> dict[str, int]:
        return {
            "micro_batch": micro_batch // self.micro_div,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def hooks(self, hooks: TrainHooks) -> TrainHooks:
        """Rank 0 reports; the stop decision is rank 0's, broadcast (all stop at one step)."""
        main = self.is_main
        return TrainHooks(
            on_progress=hooks.on_progress if main else lambda info: None,
            should_stop=lambda: broadcast_flag(hooks.should_stop() if main else False),
            log=hooks.log if main else lambda s: None,
            on_event=hooks.on_event if main else lambda kind, msg, data: None,
        )

    def before_resume(self, phase_dir: Path) -> None:
        """Rank 0 verifies the checkpoints first (moving a corrupted one aside), so every rank
        then finds the same newest checkpoint to resume from."""
        if self.world_size > 1:
            if self.is_main:
                ckpt.latest_checkpoint(phase_dir)
            barrier()

    # -------------------------------------------------------------- the model

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """FSDP2: shard every block, then the root (embedding, final norm, head), and make
        ``model.loss`` a forward method of the root. DDP wraps lazily (:meth:`micro_batch`)."""
        self._device = device
        self._wrapped = None
        if self.fsdp:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            register_fsdp_forward_method(model, "loss")

    def _wrap(self, loss_module: nn.Module) -> nn.Module:
        """The DDP wrapper of the loss module (:class:`~deeplm.model.TrainingLoss`). Rebuilt
        when the module or the frozen-layer count changes (DDP registers the trainable
        parameters once)."""
        key = (id(loss_module), loss_module.model.n_frozen)
        if self._wrapped is None or self._wrapped_key != key:
            ids = [self._device.index] if self._device.type == "cuda" else None
            self._wrapped = DDP(loss_module, device_ids=ids)
            self._wrapped_key = key
        return self._wrapped

    @contextmanager
    def micro_batch(self, loss_module: nn.Module, last: bool) -> Iterator[LossFn]:
        """Gradients are all-reduced only on the step's last micro-batch."""
        if self.world_size == 1:
            yield loss_module
        elif self.mode == "fsdp2":
            loss_module.model.set_requires_gradient_sync(last)
            yield loss_module
        else:
            wrapped = self._wrap(loss_module)
            if last:
                yield wrapped
            else:
                with wrapped.no_sync():
                    yield wrapped

    def reduce_losses(
        self, loss: torch.Tensor, unweighted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The losses keep the rank's gradient but take the value averaged over ranks, so
        logging, NaN checks and rollbacks see (and agree on) the global loss."""
        if self.world_size == 1:
            return loss, unweighted
        mean = all_reduce_mean(torch.stack([loss.detach(), unweighted.detach()]).float())
        loss = loss + (mean[0] - loss).detach()
        unweighted = unweighted + (mean[1] - unweighted).detach()
        return loss, unweighted

    def agree(self, value: float) -> float:
        return broadcast_float(value)

    def sampling_model(self, model: nn.Module) -> nn.Module | None:
        """Rank 0 samples. FSDP2: generation's cached decoding does not go through the sharded
        forward, so every rank gathers the full weights and rank 0 samples with a plain copy."""
        if self.fsdp:
            return self._full_model(model)
        return model if self.is_main else None

    def _full_model(self, model: nn.Module) -> Transformer | None:
        """FSDP2 (collective): the full weights gathered into a plain model on rank 0 (None on
        the other ranks). Built outside the training RNG, so exact resume is unaffected."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        if not self.is_main:
            return None
        if self._plain is None:
            with torch.random.fork_rng(devices=[]):
                self._plain = Transformer(model.cfg).to(self._device)
        self._plain.load_state_dict(msd)
        self._plain.set_frozen_layers(model.n_frozen)
        return self._plain

    # -------------------------------------------------------------- checkpoints

    def gather_for_save(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module | None, dict[str, Any] | None]:
        """Rank 0 writes the checkpoint (single-process format; FSDP2: after gathering the full
        model and optimizer state); all ranks meet at a barrier before and after."""
        if self.world_size == 1:
            return model, optimizer.state_dict()
        barrier()
        if self.mode == "fsdp2":
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            plain = self._full_model(model)
            osd = get_optimizer_state_dict(model, optimizer, options=opts)
            if plain is None:
                return None, None
            return plain, self._int_optimizer_state(model, optimizer, osd)
        return (model, optimizer.state_dict()) if self.is_main else (None, None)

    def after_save(self) -> None:
        if self.world_size > 1:
            barrier()

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
    ) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(saved)
            return
        full = self._fqn_optimizer_state(model, optimizer, saved)
        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, full, options=opts)

    @staticmethod
    def _param_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
        """Names of the optimizer's parameters in its own order (= state-dict indices)."""
        names = {id(p): n for n, p in model.named_parameters()}
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def _fqn_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any]
    ) -> dict[str, Any]:
        """A single-process optimizer state dict (integer keys) → FSDP2's full, name-keyed one."""
        fqns = self._param_fqns(model, optimizer)
        return {
            "state": {fqns[int(i)]: v for i, v in osd["state"].items()},
            "param_groups": [
                dict(g, params=[fqns[int(i)] for i in g["params"]]) for g in osd["param_groups"]
            ],
        }

    def _int_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any]
    ) -> dict[str, Any]:
        """FSDP2's full, name-keyed optimizer state → the single-process one (integer keys)."""
        index = {n: i for i, n in enumerate(self._param_fqns(model, optimizer))}
        groups = []
        for g in osd["param_groups"]:
            g = dict(g, params=[index[n] for n in g["params"]])
            if isinstance(g.get("betas"), list):  # as torch.optim writes it
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        return {"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups}


def distributed_trainer(
    cfg: RunConfig,
    phase_idx: int,
    run_dir: Path,
    tokenizer: Tokenizer,
    train_shard: Shard,
    val_shard: Shard,
    init_from: Path | None = None,
    hooks: TrainHooks | None = None,
) -> PhaseTrainer:
    """A :class:`PhaseTrainer` for this rank of the initialised process group."""
    parallel = DataParallel(current_env(), cfg.train.parallel)
    return PhaseTrainer(
        cfg, phase_idx, run_dir, tokenizer, train_shard, val_shard, init_from, hooks, parallel
    )


def install_sigterm_stop() -> dict[str, bool]:
    """SIGTERM (from torchrun forwarding a stop) sets a flag that rank 0's should_stop reads."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True

    signal.signal(signal.SIGTERM, handler)
    return flag


# ---------------------------------------------------------------------------- launcher


class DistributedRunError(RuntimeError):
    """The torchrun job failed (a rank crashed or was killed); its checkpoints remain."""


def launch_phase(
    run_dir: Path, cfg: RunConfig, phase_idx: int, hooks: TrainHooks, grace_s: float = 120.0
) -> PhaseOutcome:
    """Train one phase under torchrun (this node's share of ``cfg.train``'s topology) and return
    rank 0's outcome. Called by the ``train_phase`` activity in the orchestrating process, which
    stays the only writer of the StateDB: rank 0's progress and events arrive as marked lines on
    the job's stdout and are handed to ``hooks`` here, in this thread. ``hooks.should_stop()`` is
    polled here too; when it turns true a ``STOP`` file asks the ranks to checkpoint and stop at
    the next step (SIGTERM to the job's process group after ``grace_s`` seconds). An exception
    in this process (e.g. KeyboardInterrupt) sends SIGTERM to the job, which does the same."""
    phase = cfg.phases[phase_idx]
    folder = dist_dir(run_dir, phase_idx, phase)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (STOP_FILE, RESULT_FILE):
        (folder / name).unlink(missing_ok=True)
    cfg_path = RunLayout(run_dir).dist_config(phase_idx, phase.name)
    atomic_write_text(cfg_path, config_to_json(cfg))
    cmd = torchrun_command(cfg.train, [str(run_dir), str(phase_idx), "--config", str(cfg_path)])
    hooks.log(f"[{phase.name}] launching {world_size_of(cfg.train)} processes: {shlex.join(cmd)}")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=launch_env(),
        start_new_session=True,  # its own process group: a stop signal reaches every rank
    )
    rc, tail = _follow_job(proc, hooks, folder, grace_s)
    return _job_outcome(run_dir, phase_idx, phase.name, folder, rc, tail, hooks)


def _follow_job(
    proc: subprocess.Popen, hooks: TrainHooks, folder: Path, grace_s: float
) -> tuple[int, list[str]]:
    """Relay the job's output to ``hooks`` until it ends, forwarding stop requests; returns
    (exit status, the last 200 plain lines). Any exception here stops the job first."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    tail: list[str] = []
    stop_sent_at: float | None = None
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                tail = _relay(line, hooks, tail)
            if stop_sent_at is None and hooks.should_stop():
                atomic_write_text(folder / STOP_FILE, "stop requested\n")
                stop_sent_at = time.monotonic()
            elif stop_sent_at is not None and time.monotonic() - stop_sent_at > grace_s:
                _signal_group(proc, signal.SIGTERM)
                stop_sent_at = float("inf")
        rc = proc.wait()
    except BaseException:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
        raise
    reader.join(timeout=5)
    return rc, tail


def _relay(line: str, hooks: TrainHooks, tail: list[str]) -> list[str]:
    """One line of the job's output: an event for ``hooks``, or a plain line logged (and kept
    in the returned tail)."""
    event = parse_event(line)
    if event is None:
        hooks.log(line.rstrip("\n"))
        return (tail + [line.rstrip("\n")])[-200:]
    if event.pop("kind") == "progress":
        hooks.on_progress(event)
    else:
        hooks.on_event(event["type"], event["msg"], event.get("data") or {})
    return tail


def _job_outcome(
    run_dir: Path,
    phase_idx: int,
    name: str,
    folder: Path,
    rc: int,
    tail: list[str],
    hooks: TrainHooks,
) -> PhaseOutcome:
    """Rank 0's outcome from ``result.json``; a failed job raises :class:`DistributedRunError`."""
    result_path = folder / RESULT_FILE
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if result is None or result.get("status") == "failed":
        why = (result or {}).get("error") or "\n".join(crash_lines(tail))
        raise DistributedRunError(
            f"[{name}] torchrun exited with status {rc}; resume restarts from the last "
            f"checkpoint. {why}"
        )
    outcome = PhaseOutcome(**result)
    if rc != 0:
        # Rank 0 writes the result only after the last barrier of the phase, so every rank had
        # finished its work: a rank that died later (while leaving the process group) lost
        # nothing. Accept the outcome when its checkpoint is complete on disk.
        named = outcome.final_checkpoint or outcome.last_checkpoint
        latest = ckpt.latest_checkpoint(RunLayout(run_dir).phase_checkpoints(phase_idx, name))
        if named is None or latest is None or latest.path.resolve() != Path(named).resolve():
            raise DistributedRunError(
                f"[{name}] torchrun exited with status {rc} and the checkpoint the phase "
                f"reported ({named}) is not the newest complete one; resume restarts from the "
                f"last checkpoint. " + "\n".join(crash_lines(tail))
            )
        hooks.log(
            f"[{name}] warning: torchrun exited with status {rc} after the phase had "
            f"{outcome.status} with a complete checkpoint ({named}); a rank failed while shutting "
            "down, nothing was lost:\n" + "\n".join(crash_lines(tail))
        )
    return outcome


def crash_lines(tail: list[str], keep: int = 12) -> list[str]:
    """What to quote from the end of a failed job's output: the lines naming the cause (a C++
    ``terminate``/``what()``, a Python exception) first, then the last lines."""
    markers = ("terminate called", "what():", "Error", "Exception", "Traceback", "Signal ")
    causes = [line for line in tail if any(m in line for m in markers)]
    last = [line for line in tail[-keep:] if line not in causes]
    return causes[-keep:] + last


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
