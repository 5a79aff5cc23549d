"""The exception raised for checkpoints that cannot be found, converted or loaded."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, invalid or unsupported, with a message that explains the fix."""
