#!/usr/bin/env bash
# Builds the tf_lora wheel from Bazel's outputs into DEST_DIR.
#
#   bazel build //pip_package:build_pip_package
#   bazel-bin/pip_package/build_pip_package DEST_DIR
#
# Copies the package (Python sources, generated gen_*_ops.py, op libraries) out of the runfiles tree,
# dereferencing Bazel's symlinks, and runs `pip wheel` on it with the configured interpreter.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 DEST_DIR" >&2
  exit 2
fi
dest="$1"
if [[ "$dest" != /* ]]; then
  dest="${BUILD_WORKING_DIRECTORY:-$PWD}/$dest"
fi

runfiles="${RUNFILES_DIR:-$0.runfiles}"
src="$runfiles/org_tf_lora"
python="$runfiles/local_config_tf/python"
[[ -d "$src/tf_lora" ]] || { echo "build_pip_package: no tf_lora package in $src" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
(cd "$src" && find -L tf_lora \( -name '*.py' -o -name '*.so' \) -type f) | while read -r f; do
  install -D -m 644 "$src/$f" "$stage/$f"
done
for f in gen_lora_ops.py _lora_ops.so gen_sparse_table_ops.py _sparse_table_ops.so; do
  [[ -f "$stage/tf_lora/python/ops/$f" ]] || { echo "build_pip_package: $f missing" >&2; exit 1; }
done
install -m 644 "$src/pip_package/setup.py" "$src/README.md" "$src/LICENSE" "$stage/"

mkdir -p "$dest"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dest" "$stage"
ls "$dest"/tf_lora-*.whl
