"""Experiment program logic: configuration, training loop, checkpoints, outputs."""
