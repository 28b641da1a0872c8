"""The error every checkpoint reader raises: a folder or file that cannot be loaded as it stands."""

MAX_MESSAGE = 300      # characters: a message names the file and the tensor, not 200,000 shard names


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut in the middle to at most `limit` characters (its start names the file, its end the verdict)."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return text[:limit - tail - 5] + " ... " + text[-tail:]


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it stands (the message names the file and tensor).

    The message is one line of at most MAX_MESSAGE characters, whatever the file holds."""

    def __init__(self, message: str = "", *args) -> None:
        super().__init__(shorten(" ".join(str(message).split())) if not args else message, *args)
