"""Conversions between our format and foreign ones (Hugging Face, Megatron / Yuan 2.0)."""
