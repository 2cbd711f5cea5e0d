"""The one exception the loader raises for a bad checkpoint on disk."""


class CheckpointError(Exception):
    """A checkpoint directory cannot be loaded as it is.

    The message names the file (and the tensor, where one is involved) and says what to do,
    because the person reading it is usually an operator looking at a directory, not at our code.
    """
