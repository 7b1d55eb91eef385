"""Quiet TensorFlow start-up for the `tf-lora` command. Imports no TensorFlow itself.

TensorFlow writes absl's start-up lines ("oneDNN custom operations are on", "Could not find cuda drivers")
to stderr when it is first imported, whatever TF_CPP_MIN_LOG_LEVEL says. A command-line tool's stderr is
for its own diagnostics, so while `tf-lora` imports TensorFlow (through `import tf_lora`, before its `main`
runs) that output is held back, and shown only if the import fails.
"""

import contextlib
import os
import sys
import tempfile

# TensorFlow's C++ log level for the command, unless --verbose or the user's TF_CPP_MIN_LOG_LEVEL says
# otherwise: none, not even the "failed call to cuInit" error of a machine without a GPU.
QUIET_TF_LOG_LEVEL = "3"


def quiet_wanted(verbose):
    """Whether TensorFlow should start quietly: not --verbose, and the user set no level of their own."""
    return not verbose and "TF_CPP_MIN_LOG_LEVEL" not in os.environ


def command_line_start():
    """For `import tf_lora`: quiet when the process is the `tf-lora` command (its console script) without
    --verbose; a no-op anywhere else."""
    is_command = os.path.basename(sys.argv[0] if sys.argv else "") == "tf-lora"
    return tensorflow_start(verbose="--verbose" in sys.argv) if is_command else contextlib.nullcontext()


def tensorflow_start(verbose):
    """A context for the first import of TensorFlow: when quiet is wanted, the C++ log level is set and the
    import's stderr held back. Once TensorFlow is imported there is nothing left to quiet."""
    if not quiet_wanted(verbose) or "tensorflow" in sys.modules:
        return contextlib.nullcontext()
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_TF_LOG_LEVEL
    return held_back_stderr()


@contextlib.contextmanager
def held_back_stderr():
    """File descriptor 2 goes to a temporary file for the block; its contents reach stderr only if the block
    raises."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to hold back
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                sys.stderr.flush()
