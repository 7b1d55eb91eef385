"""The error every rewrite raises for a model it cannot read or a rewrite it cannot do, and the reason a
TensorFlow error gives, without its trace."""


class RewriteError(Exception):
    """A model that cannot be read, or a rewrite that cannot be done; `exit_code` for the command line (2: an
    unsupported pattern or bad input, named in the message)."""

    exit_code = 2


def reason(error) -> str:
    """The reason of an error in one line. TensorFlow's run-time errors open with "Graph execution error:"
    and the Python stack of the node that failed (indented); the reason comes after it, then the node's name
    in [[...]]."""
    lines = (getattr(error, "message", None) or str(error) or type(error).__name__).strip().splitlines()
    noise = ("Graph execution error", "Detected at node", "[[", "<stack traces unavailable>", "Node:")
    kept = [
        line.strip()
        for line in lines
        if line.strip() and not line[:1].isspace() and not line.startswith(noise)
    ]
    return " ".join(kept) or (lines[0] if lines else type(error).__name__)
