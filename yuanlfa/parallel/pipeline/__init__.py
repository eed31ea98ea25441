"""Pipeline parallelism: stage modules and schedules (the split itself is
:mod:`yuanlfa.layout.splits`)."""
