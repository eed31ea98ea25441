"""Torch-free vocabulary of layouts: pipeline splits, rank arithmetic, schedules as specs."""
