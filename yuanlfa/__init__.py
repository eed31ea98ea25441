"""yuanlfa: train Yuan 2.0-style LLMs with Localized Filtering-based Attention."""

__version__ = "0.1.0"
