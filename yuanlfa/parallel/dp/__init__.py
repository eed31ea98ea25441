"""Data parallelism: gradient buckets and their reducer, the ZeRO-1 optimizer."""
