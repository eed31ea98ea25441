"""Tensor and sequence parallelism: parallel layers, the plan that applies them, comm."""
