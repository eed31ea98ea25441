"""Bridges to other training frameworks (optional dependencies, imported on demand):

- :mod:`yuanlfa.integrations.megatron_core`: LFA attention as a megatron-core ModuleSpec and
  state-dict conversion (``pip install "yuanlfa[megatron]"``).
"""
