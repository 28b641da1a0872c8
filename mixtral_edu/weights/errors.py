"""The error every checkpoint reader raises: a folder or file that cannot be loaded as it stands."""


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it stands (the message names the file and tensor)."""
