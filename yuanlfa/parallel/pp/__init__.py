"""Pipeline parallelism: stage modules and the schedule runner."""
