"""The one error type of the checkpoint package."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""
