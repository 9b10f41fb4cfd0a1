"""Training: the phase loop (trainer.py) and its components (curriculum, guard, evaluator,
plateau, sampling, checkpointer, progress, adapters, watchdog, hooks, parallel), the step plan
(compile.py), optimizers, LR schedule, rare-token weighting, metrics, and torchrun training."""
