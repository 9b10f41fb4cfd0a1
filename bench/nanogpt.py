"""The reference the GPU speed target is measured against: a plain nanoGPT-style GPT of the same
shape (60 x 320, 5 heads, MLP 2x GELU, vocab 32k, learned positions, LayerNorm with bias,
tied embedding), whole-model ``torch.compile``, fused AdamW, bf16 autocast, full logits and
``F.cross_entropy``. About the 300 lines a user would otherwise write; ``bench/throughput.py
--nanogpt`` times it next to deeplm's training path in the same process tree.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from deeplm.device import peak_memory_bytes, synchronize


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, mlp), nn.Linear(mlp, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class NanoGPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, mlp: int, vocab: int, ctx: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(_Block(d, heads, mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def bench_nanogpt(cfg, device: torch.device, batch: int, seq_len: int, steps: int, warmup: int):
    """tokens/s of the reference at ``cfg.model``'s shape (see the module docstring)."""
    m = cfg.model
    torch.manual_seed(0)
    model = NanoGPT(
        m.n_layers, m.d_model, m.n_heads, int(m.mlp_ratio * m.d_model), m.vocab_size, seq_len
    ).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), **fused)
    fwd = torch.compile(model)
    x = torch.randint(0, m.vocab_size, (batch, seq_len + 1), device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    dt = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    return {
        "implementation": "nanogpt (whole-model compile, fused AdamW, logits head)",
        "batch": batch,
        "seq_len": seq_len,
        "parameters": n,
        "tokens_per_s": batch * seq_len * steps / dt,
        "step_ms": 1000 * dt / steps,
        "first_step_s": first,
        "peak_memory_gb": (peak_memory_bytes(device) or 0) / 2**30,
        "loss": float(loss.item()),
    }
