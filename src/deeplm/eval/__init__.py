"""Evaluation: validation loss and perplexity, sample generations, the run report."""
