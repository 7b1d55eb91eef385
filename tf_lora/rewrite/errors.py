"""The error every rewrite raises for a model it cannot read or a rewrite it cannot do."""


class RewriteError(Exception):
    """A model that cannot be read, or a rewrite that cannot be done; `exit_code` for the command line (2: an
    unsupported pattern or bad input, named in the message)."""

    exit_code = 2
