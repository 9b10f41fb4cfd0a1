"""Training: device selection, optimizers, LR schedule, checkpoints, metrics and the loop."""
