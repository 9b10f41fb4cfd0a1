#!/usr/bin/env python
"""Is regional compilation (``torch.compiler.nested_compile_region`` on the transformer block:
traced and compiled once, stamped out for every layer) correct and faster to compile for
deeplm's model on this torch? A lever for the compile time of the whole-model graph (bench/NOTES.md,
"Regional compilation").

For each backend it trains one step of a small model of the preset's block (``--layers`` deep)
from the same weights, eager and compiled (whole model, then regional), and prints the first
step's time, the loss and the largest gradient difference from eager, relative to the largest
eager gradient:

    python bench/regional_compile_check.py --layers 12 --backend inductor aot_eager
    python bench/regional_compile_check.py --preset 60m --layers 60 --device cuda --dtype bf16

Exits 1 when a regional configuration's gradients differ from eager by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

import torch

from deeplm.config import load_config
from deeplm.model import Transformer
from deeplm.model import transformer as tm
from deeplm.model.transformer import TrainingLoss


@torch.compiler.nested_compile_region
def _regional_block(block: torch.nn.Module, x, cos, sin):  # noqa: ANN001, ANN201
    return block(x, cos, sin)


class RegionalHidden:
    """Within the ``with``: ``Transformer._hidden`` with every block called through one nested
    compile region (no frozen layers, no checkpointing: what this check needs)."""

    def __enter__(self) -> RegionalHidden:
        self.original = tm.Transformer._hidden

        def hidden(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
            x = model.embd_drop(model.tok_emb(idx))
            cos, sin = model.rope(x, idx.size(1))
            for block in model.blocks:
                x = _regional_block(block, x, cos, sin)
            return model.norm_f(x)

        tm.Transformer._hidden = hidden  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        tm.Transformer._hidden = self.original  # type: ignore[method-assign]


def one_step(model: Transformer, backend: str | None, batch, dtype) -> tuple[float, float]:
    """(seconds of the first forward + backward, loss); gradients are left on ``model``."""
    fn = TrainingLoss(model)
    if backend is not None:
        fn = torch.compile(fn, dynamic=False, backend=backend)
    x, y = batch
    t0 = time.perf_counter()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss, _ = fn(x, y, None)
    loss.backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, float(loss.detach())


def grad_gap(ref: Transformer, other: Transformer) -> float:
    """Largest |gradient difference| over the largest |eager gradient|."""
    top = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    gap = 0.0
    for p, q in zip(ref.parameters(), other.parameters(), strict=True):
        if p.grad is None:
            continue
        if q.grad is None:
            return float("inf")
        gap = max(gap, (p.grad.float() - q.grad.float()).abs().max().item())
    return gap / top


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", help="whose block shape (default tiny)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--backend", nargs="+", default=["inductor"], help="torch.compile backends")
    p.add_argument("--tol", type=float, default=2e-2, help="relative gradient gap allowed")
    args = p.parse_args(argv)
    cfg = load_config(preset=args.preset).model
    cfg = dataclasses.replace(
        cfg, n_layers=args.layers, max_seq_len=max(cfg.max_seq_len, args.seq_len)
    )
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    torch.manual_seed(0)
    base = Transformer(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    batch = (tokens[:, :-1], tokens[:, 1:])
    eager = copy.deepcopy(base)
    seconds, loss = one_step(eager, None, batch, dtype)
    print(
        f"{args.layers} layers x {cfg.d_model}, {args.device} {args.dtype}, "
        f"torch {torch.__version__}"
    )
    print(f"  eager                 first step {seconds:6.1f}s  loss {loss:.6f}")
    failed = False
    for backend in args.backend:
        for regional in (False, True):
            model = copy.deepcopy(base)
            torch._dynamo.reset()
            if regional:
                with RegionalHidden():
                    seconds, loss = one_step(model, backend, batch, dtype)
            else:
                seconds, loss = one_step(model, backend, batch, dtype)
            gap = grad_gap(eager, model)
            name = f"{backend}{' regional' if regional else ' model'}"
            bad = gap > args.tol
            failed |= bad and regional
            print(
                f"  {name:21s} first step {seconds:6.1f}s  loss {loss:.6f}  "
                f"grad gap {gap:.2e}{'  WRONG GRADIENTS' if bad else ''}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
