"""Sample generations from prompts, reproducible through a dedicated RNG (the training RNG is
never touched, so sampling cannot change a run's result)."""

from __future__ import annotations

import torch
from torch import nn

from deeplm.model import generate
from deeplm.tokenizer import Tokenizer


@torch.no_grad()
def sample_texts(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    device: torch.device,
    seed: int = 0,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    allow_special: bool = False,
) -> list[dict[str, str]]:
    """Generate one continuation per prompt; returns ``[{"prompt", "completion"}]``."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device=device)
            gen.manual_seed(seed + i)
            ids = [tokenizer.bos_id] + tokenizer.encode(prompt, allow_special=allow_special)
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            result = generate(
                model,
                idx,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_id=tokenizer.eos_id,
                generator=gen,
            )
            new_ids = result[0, len(ids) :].tolist()
            if tokenizer.eos_id in new_ids:
                new_ids = new_ids[: new_ids.index(tokenizer.eos_id)]
            out.append({"prompt": prompt, "completion": tokenizer.decode_generated(new_ids)})
    finally:
        model.train(was_training)
    return out
