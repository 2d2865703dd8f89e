"""The one exception type for problems a user can fix."""


class FusionError(Exception):
    """A bad recipe key, path, tokenizer, shard or value.

    The message names the key or file and says how to fix it. `python -m fusion.fit` prints it
    on one line and exits with code 2, without a traceback.
    """
