"""Quiet TensorFlow start-up for the `tf-lora` command. Imports no TensorFlow itself.

TensorFlow writes absl's start-up lines ("oneDNN custom operations are on", "Could not find cuda drivers")
to stderr when it is first imported, whatever TF_CPP_MIN_LOG_LEVEL says. A command-line tool's stderr is
for its own diagnostics, so while `tf-lora` imports TensorFlow (through `import tf_lora`, before its `main`
runs) that output is held back, and shown only if the import fails.
"""

import contextlib
import json
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
    --verbose, and a Ctrl-C while TensorFlow starts ends it as one during a command does (exit 130, nothing
    written); a no-op anywhere else."""
    is_command = os.path.basename(sys.argv[0] if sys.argv else "") == "tf-lora"
    if not is_command:
        return contextlib.nullcontext()
    return interrupted_start(tensorflow_start(verbose="--verbose" in sys.argv), sys.argv[1:])


@contextlib.contextmanager
def interrupted_start(inner, argv):
    """`inner`, whose Ctrl-C (KeyboardInterrupt) ends the process with status 130 and the command's failure
    line (and, with --json, its failure object) instead of a traceback: no command has run yet."""
    try:
        with inner:
            yield
    except KeyboardInterrupt:
        command = next((a for a in argv if not a.startswith("-")), None)
        message = "interrupted while starting; nothing written"
        print(f"tf-lora {command}: {message}" if command else f"tf-lora: {message}", file=sys.stderr)
        if "--json" in argv:
            failure = {"command": command, "ok": False, "error": message, "exit_code": 130}
            print(json.dumps(failure, indent=2))
        raise SystemExit(130) from None


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
