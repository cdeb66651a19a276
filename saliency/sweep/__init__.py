"""Experiment machinery: training loop, sweep runner, result records. Not imported by the core."""
