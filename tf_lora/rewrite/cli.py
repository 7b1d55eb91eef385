"""`tf-lora`: the command line over tf_lora.rewrite (each command is a call into the library)."""

import argparse
import json
import sys

from rich.console import Console

from tf_lora.rewrite.embedding import replace_embedding
from tf_lora.rewrite.fold import fold
from tf_lora.rewrite.inject import inject
from tf_lora.rewrite.inspect import inspect
from tf_lora.rewrite.saved_model import RewriteError
from tf_lora.rewrite.swap import load_adapter_file, swap_adapter
from tf_lora.rewrite.verify import verify


def _parser():
    parser = argparse.ArgumentParser(
        prog="tf-lora",
        description="Inspect and rewrite TensorFlow SavedModels that use (or could use) tf_lora's ops.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "inspect", help="signatures, tf_lora ops and adapters, MatMuls, embedding lookups"
    )
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON for machines")

    p = _rewriting(
        commands,
        "fold",
        help="fold LoRA adapters into their MatMul weights: the output runs on stock TensorFlow",
        description="Each LoRA apply on a MatMul becomes that MatMul with W' = W + scale * A @ B, computed "
        "from the model's variables. The output loads and runs without tf_lora (e.g. under TF Serving).",
    )
    p.add_argument(
        "--adapter", metavar="REGEX", help="fold only adapters whose A variable name matches; drop the others"
    )

    p = _rewriting(
        commands,
        "inject",
        help="add new LoRA adapters (A He-uniform, B zero) to the MatMuls of matching weights",
        description="Every MatMul whose weight variable (or its layer, the name without its last part) fully "
        "matches --target gets a LoRA apply with new trainable variables <weight>/lora_a and "
        "<weight>/lora_b. B starts at zero, so the outputs are unchanged until the adapter is trained.",
    )
    p.add_argument("--target", required=True, metavar="REGEX", help="weight variable or layer names to adapt")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank r")
    p.add_argument("--alpha", type=float, required=True, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--seed", type=int, default=0, help="seed of A's He-uniform initialisation")

    p = _rewriting(
        commands,
        "replace-embedding",
        help="embedding gathers on matching variables become pulls from a tf_lora sparse table",
        description="Every GatherV2 (axis 0) or ResourceGather on a float32 [rows, dim] variable whose name "
        "(or layer) fully matches --target reads from a new SparseTable holding the variable's rows, id = "
        "row index: outputs are unchanged for ids in [0, rows), and the table grows past them when trained.",
    )
    p.add_argument("--target", required=True, metavar="REGEX", help="embedding variable or layer names")

    p = _rewriting(
        commands,
        "swap-adapter",
        help="put the weights of a PEFT or kohya adapter file into the model's LoRA applies",
        description="Each LoRA apply is named by its base weight's layer (q_proj/kernel -> q_proj); the "
        "file's modules map to those names (--map). A and B go into the adapter's variables (same rank), the "
        "scale becomes the file's. --verify reports how far the outputs moved (they change on purpose).",
    )
    p.add_argument(
        "--adapter", required=True, metavar="PATH", help="a PEFT directory or a kohya .safetensors file"
    )
    p.add_argument("--sha256", help="refuse an adapter file whose checksum differs")
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="REGEX=REPLACEMENT",
        help="file module -> layer name, first full match wins (repeatable), e.g. 'model\\.(\\w+)=\\1'",
    )
    p.add_argument("--partial", action="store_true", help="allow file modules that match no LoRA apply")
    return parser


_MODEL_HELP = "a SavedModel directory (TF2 or TF1), a .meta file or a GraphDef .pb/.pbtxt with its checkpoint"


def _rewriting(commands, name, **kwargs):
    """A rewriting command: MODEL and OUT, and the options every rewrite takes."""
    p = commands.add_parser(name, **kwargs)
    p.add_argument("model", help=_MODEL_HELP + " (not changed)")
    p.add_argument("out", help="the output directory (written whole or not at all)")
    _common(p)
    return p


def _common(p):
    p.add_argument("--verify", action="store_true", help="run both models on generated inputs and compare")
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="for --verify, relative to the outputs' size"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def main(argv=None):
    args = _parser().parse_args(argv)
    err = Console(stderr=True, quiet=getattr(args, "quiet", False), highlight=False, soft_wrap=True)
    try:
        if args.command == "inspect":
            report = inspect(args.model)
            print(json.dumps(report, indent=2) if args.json else _describe(report))
            return 0
        with err.status(f"{args.command} {args.model}") as status:
            if args.command == "fold":
                report = fold(
                    args.model,
                    args.out,
                    adapter=args.adapter,
                    overwrite=args.overwrite,
                    progress=status.update,
                )
            elif args.command == "inject":
                report = inject(
                    args.model,
                    args.out,
                    args.target,
                    args.rank,
                    args.alpha,
                    seed=args.seed,
                    overwrite=args.overwrite,
                    progress=status.update,
                )
            elif args.command == "replace-embedding":
                report = replace_embedding(
                    args.model, args.out, args.target, overwrite=args.overwrite, progress=status.update
                )
            else:
                report = swap_adapter(
                    args.model,
                    args.out,
                    load_adapter_file(args.adapter, sha256=args.sha256),
                    mapping=[_pair(m) for m in args.map] or None,
                    strict=not args.partial,
                    overwrite=args.overwrite,
                    progress=status.update,
                )
        _print_report(err, report)
        if args.verify:
            with err.status("verify: running both models"):
                differences = verify(
                    args.model,
                    args.out,
                    tolerance=args.tolerance,
                    expect_equal=args.command != "swap-adapter",
                )
            for name, diff in differences.items():
                err.print(f"verify {name}: max |difference| = {diff:.3g}")
        err.print(f"wrote {args.out}")
        return 0
    except RewriteError as e:
        print(f"tf-lora {args.command}: {e}", file=sys.stderr)
        return e.exit_code


def _print_report(err, report):
    for i in report if isinstance(report, list) else []:
        if hasattr(i, "table"):
            err.print(f"{i.variable} {list(i.shape)}: sparse table {i.table} for {', '.join(i.lookups)}")
        else:
            err.print(f"{i.weight} {list(i.shape)}: new adapter {i.a}, {i.b} on {', '.join(i.matmuls)}")
    for f in getattr(report, "folds", []):
        verb = "folded into" if f.folded else "dropped from"
        err.print(
            f"{f.adapter} (rank {f.rank}, scale {f.scale:g}) {verb} {f.weight}  [{f.function}/{f.node}]"
        )
    for module, layer in getattr(report, "swapped", {}).items():
        err.print(f"{module} -> {layer}")
    if getattr(report, "unmatched_modules", None):
        err.print(f"modules that matched no LoRA apply: {report.unmatched_modules}")
    if getattr(report, "layers_without_adapter", None):
        err.print(f"LoRA applies that kept their adapter: {report.layers_without_adapter}")


def _pair(text):
    pattern, sep, replacement = text.partition("=")
    if not sep:
        raise RewriteError(f"--map wants REGEX=REPLACEMENT, got {text!r}")
    return pattern, replacement


def _describe(report):
    lines = [f"SavedModel {report['path']}", "signatures:"]
    for name, sig in report["signatures"].items():
        inputs = ", ".join(f"{k}: {v['dtype']}{v['shape']}" for k, v in sig["inputs"].items())
        outputs = ", ".join(f"{k}: {v['dtype']}{v['shape']}" for k, v in sig["outputs"].items())
        lines.append(f"  {name}({inputs}) -> {outputs}")
    lines.append(f"tf_lora ops: {len(report['tf_lora_ops'])}")
    for op in report["tf_lora_ops"]:
        lines.append(f"  {op['op']}  {op['function']}/{op['node']}")
    lines.append(f"adapters: {len(report['adapters'])}")
    for a in report["adapters"]:
        if "not_foldable" in a:
            lines.append(f"  {a['function']}/{a['node']}: not foldable: {a['not_foldable']}")
        else:
            lines.append(
                f"  {a['adapter']} on {a['weight']} {a['weight_shape']}: "
                f"rank {a['rank']}, scale {a['scale']:g}"
            )
    lines.append(f"MatMul candidates for an adapter: {len(report['matmul_candidates'])}")
    for m in report["matmul_candidates"]:
        lines.append(f"  {m['weight']} {m['shape']}  [{m['function']}/{m['node']}]")
    lines.append(f"embedding lookups: {len(report['embedding_lookups'])}")
    for e in report["embedding_lookups"]:
        lines.append(f"  {e['op']} on {e['variable']} {e['shape']}  [{e['function']}/{e['node']}]")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
