"""The one exception type for problems a user can fix."""


class FusionError(Exception):
    """A bad recipe key, path, tokenizer, shard or value.

    The message names the key or file and says how to fix it. `python -m fusion.fit` prints it
    on one line and exits with code 2, without a traceback.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
