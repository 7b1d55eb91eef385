"""Writes a rewritten model: its proto with the input's checkpoint (some values replaced) in the input's own
format, staged and installed by output_dir."""

import os
import shutil

import tensorflow as tf

from tf_lora.rewrite.errors import RewriteError
from tf_lora.rewrite.graph_defs import stripped_op_names
from tf_lora.rewrite.model_files import ModelFiles
from tf_lora.rewrite.output_dir import install_output, prepared_output


def write_saved_model(files: ModelFiles, proto, new_values: dict, out, overwrite=False, finish=None):
    """Writes `proto` with the checkpoint of `files`, `new_values` {checkpoint key: array, or None to drop the
    key} replacing values, to `out` (a SavedModel directory, or for a MetaGraphDef file a directory with
    `<name>.meta` and the checkpoint `<name>`): staged in a temporary directory beside it and renamed into
    place only once complete. `finish(staging_dir) -> dir` may turn the staged copy into the final one
    (inject re-saves it)."""
    with prepared_output(files, out, overwrite) as (out, staging):
        final = staging
        try:
            _write(files, proto, new_values, staging)
            if finish is not None:
                final = finish(staging)
            install_output(final, out)
        finally:
            shutil.rmtree(final, ignore_errors=True)


def _write(files, proto, new_values, staging):
    """The proto and checkpoint, as the input's format has them, in `staging`."""
    for meta in [proto] if files.kind in ("meta_graph", "graph_def") else proto.meta_graphs:
        used = stripped_op_names(meta)
        kept = [op for op in meta.meta_info_def.stripped_op_list.op if op.name in used]
        del meta.meta_info_def.stripped_op_list.op[:]
        meta.meta_info_def.stripped_op_list.op.extend(kept)
    if files.kind in ("meta_graph", "graph_def"):  # OUT/<name>.meta (or .pb), checkpoint OUT/<name>
        os.makedirs(staging)
        base = os.path.basename(files.prefix)
        if files.kind == "meta_graph":
            with open(os.path.join(staging, base + ".meta"), "wb") as f:
                f.write(proto.SerializeToString())
        else:
            with open(os.path.join(staging, base + ".pb"), "wb") as f:
                f.write(proto.graph_def.SerializeToString())
        _write_checkpoint(files.reader, new_values, os.path.join(staging, base))
        with open(os.path.join(staging, "checkpoint"), "w") as f:
            f.write(f'model_checkpoint_path: "{base}"\nall_model_checkpoint_paths: "{base}"\n')
    else:
        shutil.copytree(files.path, staging, ignore=shutil.ignore_patterns("variables", "fingerprint.pb"))
        with open(os.path.join(staging, "saved_model.pb"), "wb") as f:
            f.write(proto.SerializeToString())
        if files.reader is not None:
            os.makedirs(os.path.join(staging, "variables"))
            _write_checkpoint(files.reader, new_values, os.path.join(staging, "variables", "variables"))
        if files.kind == "saved_model":
            _write_fingerprint(staging)


def _write_checkpoint(reader, new_values, prefix):
    """The reader's tensors with `new_values` {key: array} replacing or adding entries (the object graph too,
    under its key); a key whose new value is None is left out."""
    keys = sorted(
        k
        for k in set(reader.get_variable_to_shape_map()) | set(new_values)
        if k not in new_values or new_values[k] is not None
    )
    tensors = []
    for key in keys:
        try:
            value = new_values[key] if key in new_values else reader.get_tensor(key)
        except (tf.errors.OpError, IndexError, ValueError) as e:  # a truncated data file: IndexError
            raise RewriteError(f"{prefix}: unreadable checkpoint, reading {key} ({e})") from None
        tensors.append(tf.constant(value))
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=tensors)


def _write_fingerprint(path):
    try:
        from tensorflow.python.saved_model import fingerprinting_utils  # noqa: PLC0415 - private, optional

        fingerprinting_utils.write_fingerprint(path)
    except (ImportError, AttributeError, ValueError):  # the fingerprint is optional; TF loads without it
        pass
