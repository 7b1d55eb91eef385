"""Where a rewrite writes: checks on OUT, a staging directory beside it, and the rename that installs the
complete result (an existing OUT is replaced only once the new one is whole)."""

import contextlib
import os
import shutil

from tf_lora.rewrite.errors import RewriteError


def check_output(source, out, overwrite):
    """Checks that a rewrite of the model at `source` may write `out`; returns OUT's real path. OUT must not
    be the input, hold it, or lie inside it; an existing OUT must be a directory and needs `overwrite`; a
    missing OUT needs an existing ancestor that is a directory (its missing parents are created later)."""
    out = os.path.realpath(os.fspath(out))
    source = os.path.realpath(os.fspath(source))
    model_dir = source if os.path.isdir(source) else os.path.dirname(source)
    if (
        out == model_dir
        or source.startswith(out + os.sep)
        or out.startswith(model_dir + os.sep)
        and (os.path.isdir(source))
    ):
        raise RewriteError(f"{out}: the output must not be the input, contain it, or lie inside it")
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise RewriteError(f"{out} exists and is not a directory; refusing to replace it")
        if not overwrite:
            raise RewriteError(f"{out} exists (pass --overwrite / overwrite=True to replace it)")
    ancestor = os.path.dirname(out)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise RewriteError(f"{out}: cannot be created, {ancestor} is not a directory")
    return out


def make_parents(out):
    """Creates OUT's missing parent directories; returns those it created (outermost first), for a caller
    that removes them again when it writes nothing."""
    missing = []
    parent = os.path.dirname(out)
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    created = []
    try:
        for directory in reversed(missing):
            os.mkdir(directory)
            created.append(directory)
    except OSError as e:
        remove_if_empty(created)
        raise RewriteError(f"{out}: cannot be created ({e.strerror}: {e.filename})") from None
    return created


def remove_if_empty(directories):
    """Removes directories (given outermost first) that are empty, innermost first."""
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            return


@contextlib.contextmanager
def prepared_output(files, out, overwrite):
    """Checks where a rewrite may write (`check_output`), creates OUT's missing parents and yields (OUT, a
    fresh staging path beside it). The staging path is removed when the block ends; when it raises, so are
    the parents created for OUT."""
    out = check_output(files.path, out, overwrite)
    created = make_parents(out)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tf_lora_tmp_{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield out, staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_if_empty(created)
        raise
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_output(source, out, overwrite=False):
    """For a caller that checks a rewrite before it is installed (the command line's --verify): checks OUT as
    `prepared_output` does and yields a fresh path beside it for the rewrite to write. When the block ends
    without an exception, the directory written there replaces OUT (atomically, as `install_output` does);
    when it raises, that directory and the parents created for OUT are removed, and an existing OUT is left
    as it was."""
    out = check_output(source, out, overwrite)
    created = make_parents(out)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tf_lora_stage_{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    installed = False
    try:
        yield staging
        if not os.path.isdir(staging):
            raise RewriteError(f"{out}: the rewrite wrote nothing")
        if os.path.lexists(out) and not overwrite:
            raise RewriteError(f"{out} exists (pass --overwrite / overwrite=True to replace it)")
        install_output(staging, out)
        installed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not installed:
            remove_if_empty(created)


def install_output(final, out):
    """Renames the complete `final` to `out`; an old `out` is moved aside first and removed only after."""
    old = None
    if os.path.exists(out):
        old = f"{out}.tf_lora_old_{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    try:
        os.rename(final, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
