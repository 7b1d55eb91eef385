"""`tf-lora`: the command line over tf_lora.rewrite (each command is a call into the library).

Results go to stdout (text, or one JSON object with --json); progress, warnings and errors go to stderr.
This module imports no TensorFlow when it loads: `main` first decides how loud TensorFlow may be
(--verbose, TF_CPP_MIN_LOG_LEVEL), then imports the library.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import traceback
from typing import ClassVar

from rich.console import Console

from tf_lora import _quiet
from tf_lora.rewrite.errors import reason


class _Parser(argparse.ArgumentParser):
    """argparse's, whose usage errors also print the JSON failure object when --json is given."""

    def error(self, message):
        if "--json" in self._argv:
            command = self.prog.split(" ", 1)[1] if " " in self.prog else None
            print(json.dumps(Failure(command, message, 2).to_json(), indent=2))
        super().error(message)


def _parser(argv=None):
    _Parser._argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(
        prog="tf-lora",
        description="Inspect and rewrite TensorFlow SavedModels that use (or could use) tf_lora's ops. "
        "Results go to stdout (--json: one JSON object, also for an error: ok false); progress, warnings "
        "and errors to stderr. Exit status 2: bad input or a rewrite that cannot be done, nothing written.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "inspect",
        help="signatures, tf_lora ops and adapters, MatMuls (BatchMatMuls too), Einsum projections, "
        "embedding lookups",
    )
    p.add_argument("model", help=_MODEL_HELP)
    p.set_defaults(run=_inspect)
    _output_options(p)

    p = _rewriting(
        commands,
        "fold",
        _fold,
        help="fold LoRA adapters into their MatMul and Einsum weights: the output runs on stock TensorFlow",
        description="Each LoRA apply on a MatMul becomes that MatMul with W' = W + scale * A @ B, computed "
        "from the model's variables; one on an Einsum projection, or on a BatchMatMul by a reshaped kernel, "
        "adds scale * A @ B to the kernel, in the kernel's layout. The output loads and runs without tf_lora "
        "(e.g. under TF Serving).",
    )
    p.add_argument(
        "--adapter",
        metavar="REGEX",
        type=_regex,
        help="fold only adapters whose A variable name matches (searched); drop the others. One that "
        "matches no adapter is an error (exit 2) that lists the adapters",
    )

    p = _rewriting(
        commands,
        "inject",
        _inject,
        help="add new LoRA adapters (A He-uniform, B zero) to the MatMuls and Einsums of matching weights",
        description="Every MatMul, BatchMatMul or Einsum projection whose weight variable (or its layer, the "
        "name without its last part) fully matches --target gets a LoRA apply with new trainable variables "
        "<weight>/lora_a and <weight>/lora_b. An Einsum's kernel is seen as a matrix [in, out] through its "
        "equation (the kernel axes the input contracts, and those the output keeps), its rows reshaped to "
        "it; a BatchMatMul's as the matrix its reshapes and transposes make of it. B starts at zero, so "
        "the outputs are unchanged until the adapter is trained. "
        "A matching weight that already has a LoRA adapter is an error (exit 2, nothing written) naming "
        "it: leave it out of --target, or fold the model first.",
    )
    p.add_argument(
        "--target", required=True, metavar="REGEX", type=_regex, help="weight variable or layer names"
    )
    p.add_argument("--rank", type=int, required=True, help="LoRA rank r")
    p.add_argument("--alpha", type=_finite, required=True, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--seed", type=int, default=0, help="seed of A's He-uniform initialisation")

    p = _rewriting(
        commands,
        "replace-embedding",
        _replace_embedding,
        help="embedding gathers on matching variables become pulls from a tf_lora sparse table",
        description="Every GatherV2 (axis 0) or ResourceGather on a float32 [rows, dim] variable whose name "
        "(or layer) fully matches --target reads from a new SparseTable holding the variable's rows, id = "
        "row index: outputs are unchanged for ids in [0, rows), and the table grows past them when trained.",
    )
    p.add_argument(
        "--target", required=True, metavar="REGEX", type=_regex, help="embedding variable or layer names"
    )

    p = _rewriting(
        commands,
        "densify",
        _densify,
        help="tf_lora sparse tables become variables read by core ops: stock TF Serving runs the output",
        description="Each SparseTable becomes stock TensorFlow objects, its ids (a variable), their rows "
        "and a zero row (a variable) and a TensorFlow hash table from id to row filled from the ids when the "
        "model loads, and each inference pull from it a lookup and a gather: the same outputs (an id the "
        "table does not hold reads the zero row, as the pull reads it) from core TensorFlow ops only, so the "
        "output loads in TF Serving or any TensorFlow without tf_lora. A function that pushes into a table, "
        "pulls while training or pulls inside a loop is an error (exit 2): densify a serving export "
        "(model.export). --verify runs both models on integer inputs drawn from ids the tables kept and ids "
        "no table held.",
    )
    p.add_argument(
        "--table",
        metavar="REGEX",
        type=_regex,
        help="densify only tables whose name (a SparseEmbedding's: the layer's) or object path fully "
        "matches; the others stay tf_lora tables",
    )
    p.add_argument(
        "--min-update-count",
        type=_count,
        default=0,
        metavar="N",
        help="leave out ids pushed fewer than N times (they read as zero rows, as after "
        "table.evict(N)): a smaller serving model without rarely trained ids",
    )

    p = _rewriting(
        commands,
        "swap-adapter",
        _swap_adapter,
        outputs_change=True,
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
    p.add_argument(
        "--partial",
        action="store_true",
        help="allow file modules that match no LoRA apply (named in a warning)",
    )
    return parser


_MODEL_HELP = "a SavedModel directory (TF2 or TF1), a .meta file or a GraphDef .pb/.pbtxt with its checkpoint"


def _rewriting(commands, name, rewrite, outputs_change=False, **kwargs):
    """A rewriting command: MODEL and OUT, and the options every rewrite takes. `rewrite(args, out, progress)`
    writes the rewrite to `out` and returns the command's report class with its own fields filled in
    (`functools.partial`); `outputs_change`: --verify reports differences instead of checking them."""
    p = commands.add_parser(name, **kwargs)
    p.set_defaults(run=_run_rewrite, rewrite=rewrite, outputs_change=outputs_change)
    p.add_argument("model", help=_MODEL_HELP + " (not changed)")
    p.add_argument(
        "out",
        help="the output directory: written whole or not at all (nothing is left there when the rewrite or "
        "--verify fails; an existing OUT replaced with --overwrite stays as it was then)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="run both models on generated inputs and compare, before OUT is written",
    )
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=1e-4,
        help="for --verify, relative to the outputs' size (default 1e-4)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    _output_options(p)
    return p


def _output_options(p):
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show TensorFlow's own start-up and C++ logs (hidden unless TF_CPP_MIN_LOG_LEVEL is set), "
        "and the traceback of an I/O error",
    )


def _regex(text):
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({e})") from None
    return text


def _finite(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"wants a finite number, got {text!r}")
    return value


def _count(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"wants an integer >= 0, got {text!r}")
    return value


def _tolerance(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"wants a number >= 0, got {text!r}")
    return value


# -- reports -------------------------------------------------------------------------------------------------


class Report:
    """What a command found or did: `text()` for people, `to_json()` (one JSON object) for --json, and
    `warnings()`, lines for stderr about what the user may not expect (their facts are in both renderings)."""

    def text(self) -> str:
        raise NotImplementedError

    def to_json(self) -> dict:
        raise NotImplementedError

    def warnings(self) -> list:
        return []


@dataclasses.dataclass
class Failure(Report):
    """A command that failed: nothing was written."""

    command: str
    error: str
    exit_code: int = 2

    def text(self):
        return f"tf-lora {self.command}: {self.error}"

    def to_json(self):
        return {"command": self.command, "ok": False, "error": self.error, "exit_code": self.exit_code}


@dataclasses.dataclass
class InspectReport(Report):
    """tf_lora.rewrite.inspect's description of a model (its keys are the JSON's, after command and ok)."""

    info: dict

    def text(self):
        return _describe(self.info)

    def to_json(self):
        return {"command": "inspect", "ok": True, **self.info}


@dataclasses.dataclass
class Verification:
    """--verify: the largest |difference| per signature; `tolerance` None where differences are only reported
    (swap-adapter changes the outputs on purpose)."""

    max_difference: dict
    tolerance: float | None

    def lines(self):
        return [f"verify {name}: max |difference| = {diff:.3g}" for name, diff in self.max_difference.items()]

    def to_json(self):
        return {
            "max_difference": {name: _number(diff) for name, diff in self.max_difference.items()},
            "tolerance": self.tolerance,
        }


@dataclasses.dataclass
class RewriteReport(Report):
    """What a rewriting command wrote: MODEL, OUT, the --verify result (None without it) and, in each
    subclass, the rewrite's own facts (`details` as text lines, `detail_json` as JSON fields)."""

    command: ClassVar[str]
    model: str
    out: str
    verification: Verification | None

    def details(self) -> list:
        raise NotImplementedError

    def detail_json(self) -> dict:
        raise NotImplementedError

    def text(self):
        checked = self.verification.lines() if self.verification is not None else []
        return "\n".join([*self.details(), *checked, f"wrote {self.out}"])

    def to_json(self):
        return {
            "command": self.command,
            "ok": True,
            "model": self.model,
            "out": self.out,
            **self.detail_json(),
            "verify": self.verification.to_json() if self.verification is not None else None,
        }


@dataclasses.dataclass
class FoldResult(RewriteReport):
    command = "fold"
    folds: list  # [tf_lora.rewrite.Fold]
    weights: dict  # weight name -> number of adapters folded into it

    def details(self):
        return [
            f"{f.adapter} (rank {f.rank}, scale {f.scale:g}) {'folded into' if f.folded else 'dropped from'} "
            f"{f.weight}  [{f.function}/{f.node}]"
            for f in self.folds
        ]

    def detail_json(self):
        return {"folds": [dataclasses.asdict(f) for f in self.folds], "weights": dict(self.weights)}


@dataclasses.dataclass
class InjectResult(RewriteReport):
    command = "inject"
    injected: list  # [tf_lora.rewrite.Injected]

    def details(self):
        return [
            f"{i.weight} {list(i.shape)}: new adapter {i.a}, {i.b} on {', '.join(i.matmuls)}"
            for i in self.injected
        ]

    def detail_json(self):
        return {"injected": [dataclasses.asdict(i) for i in self.injected]}


@dataclasses.dataclass
class ReplaceEmbeddingResult(RewriteReport):
    command = "replace-embedding"
    replaced: list  # [tf_lora.rewrite.Replaced]

    def details(self):
        return [
            f"{r.variable} {list(r.shape)}: sparse table {r.table} for {', '.join(r.lookups)}"
            for r in self.replaced
        ]

    def detail_json(self):
        return {"replaced": [dataclasses.asdict(r) for r in self.replaced]}


@dataclasses.dataclass
class DensifyResult(RewriteReport):
    command = "densify"
    densified: list  # [tf_lora.rewrite.Densified]

    def details(self):
        lines = []
        for d in self.densified:
            left = f" ({d.left_out} left out)" if d.left_out else ""
            lookups = ", ".join(d.lookups) or "no lookup"
            made = ", ".join(v for v in (d.keys, d.values) if v)
            lines.append(f"table {d.name} ({d.table}, dim {d.dim}): {d.ids} ids{left} -> {made}")
            lines.append(f"  lookups: {lookups}")
        return lines

    def detail_json(self):
        return {"densified": [dataclasses.asdict(d) for d in self.densified]}


@dataclasses.dataclass
class SwapAdapterResult(RewriteReport):
    command = "swap-adapter"
    adapter: str  # the adapter file or directory
    swapped: dict  # file module -> layer
    unmatched_modules: list  # file modules that went nowhere (--partial)
    layers_without_adapter: list  # LoRA applies that kept the model's own adapter

    def details(self):
        return [f"{module} -> {layer}" for module, layer in self.swapped.items()]

    def detail_json(self):
        return {
            "adapter": self.adapter,
            "swapped": dict(self.swapped),
            "unmatched_modules": list(self.unmatched_modules),
            "layers_without_adapter": list(self.layers_without_adapter),
        }

    def warnings(self):
        found = []
        if self.unmatched_modules:
            found.append(f"modules that matched no LoRA apply: {self.unmatched_modules}")
        if self.layers_without_adapter:
            found.append(f"LoRA applies that kept their adapter: {self.layers_without_adapter}")
        return found


def _number(value):
    """A float for JSON, which has no inf or NaN: those as the strings "inf", "nan"."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _json_default(value):
    import numpy as np  # numpy scalars only show up once the library has run

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- running -------------------------------------------------------------------------------------------------


def main(argv=None):
    args = _parser(argv).parse_args(argv)
    _import_library(args.verbose)
    import tensorflow as tf  # imported by _import_library, as quietly as asked

    from tf_lora.rewrite import RewriteError

    names = _OutputNames(getattr(args, "out", None))
    # SIGTERM (timeout, kill, a cancelled CI job, Kubernetes) unwinds like Ctrl-C: the staging directory
    # beside OUT is removed on the way out.
    previous = _catch_sigterm()
    try:
        report = args.run(args, names)
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, _Terminated) else 130
        return _fail(args, f"{str(e) or 'interrupted'}; {_interrupted_output(args)}", code)
    except RewriteError as e:
        return _fail(args, names.clean(_without_prefix(args.command, str(e))), e.exit_code)
    except (OSError, tf.errors.OpError) as e:
        if args.verbose:
            traceback.print_exc()
        return _fail(args, names.clean(_io_message(e)), 2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for line in report.warnings():
        print(f"tf-lora {args.command}: warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=_json_default))
    else:
        print(report.text())
    return 0


class _Terminated(KeyboardInterrupt):
    pass


def _catch_sigterm():
    """Makes SIGTERM unwind as Ctrl-C does (the staging directory is removed on the way out) and returns
    the handler it replaced; None where it cannot or should not (not the main thread, SIGTERM ignored, a
    handler installed outside Python)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None or previous == signal.SIG_IGN:
        return None
    signal.signal(signal.SIGTERM, _terminated)
    return previous


def _terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise _Terminated("terminated (SIGTERM)")


def _interrupted_output(args):
    out = getattr(args, "out", None)
    if out is None:
        return "nothing written"
    return f"{out} left as it was" if os.path.lexists(out) else "nothing written"


def _inspect(args, names) -> Report:
    from tf_lora.rewrite import inspect

    return InspectReport(inspect(args.model))


def _run_rewrite(args, names) -> Report:
    """Runs a rewriting command: the rewrite writes beside OUT; OUT is replaced only after --verify passed
    (staged_output)."""
    from tf_lora.rewrite import RewriteError, verify
    from tf_lora.rewrite.output_dir import staged_output

    existed = os.path.lexists(args.out)
    err = Console(stderr=True, quiet=args.quiet, highlight=False, soft_wrap=True)
    with (
        staged_output(args.model, args.out, args.overwrite) as staging,
        err.status(f"{args.command} {args.model}") as status,
    ):
        names.staging = staging

        def progress(message):
            status.update(names.clean(message))

        report = args.rewrite(args, staging, progress)
        verification = None
        if args.verify:
            status.update("verify: running both models")
            equal = not args.outputs_change
            try:
                differences = verify(
                    args.model,
                    staging,
                    tolerance=args.tolerance,
                    expect_equal=equal,
                    integers=getattr(args, "verify_integers", None),
                )
            except RewriteError as e:
                kept = f"{args.out} left as it was" if existed else "nothing written"
                raise RewriteError(f"{e}; {kept}") from None
            verification = Verification(differences, args.tolerance if equal else None)
    return report(model=args.model, out=args.out, verification=verification)


def _fold(args, out, progress):
    from tf_lora.rewrite import fold

    result = fold(args.model, out, adapter=args.adapter, progress=progress)
    return functools.partial(FoldResult, folds=result.folds, weights=result.weights)


def _inject(args, out, progress):
    from tf_lora.rewrite import inject

    _refuse_adapted_weights(args.model, args.target)
    injected = inject(args.model, out, args.target, args.rank, args.alpha, seed=args.seed, progress=progress)
    return functools.partial(InjectResult, injected=injected)


def _replace_embedding(args, out, progress):
    from tf_lora.rewrite import replace_embedding

    replaced = replace_embedding(args.model, out, args.target, progress=progress)
    return functools.partial(ReplaceEmbeddingResult, replaced=replaced)


def _densify(args, out, progress):
    from tf_lora.rewrite import densify

    report = densify(
        args.model, out, table=args.table, min_update_count=args.min_update_count, progress=progress
    )
    args.verify_integers = report.probe_ids
    return functools.partial(DensifyResult, densified=report.tables)


def _swap_adapter(args, out, progress):
    from tf_lora.rewrite import swap_adapter
    from tf_lora.rewrite.adapter_swap import load_adapter_file

    adapters = load_adapter_file(args.adapter, sha256=args.sha256)
    mapping = [_pair(m) for m in args.map] or None
    result = swap_adapter(
        args.model, out, adapters, mapping=mapping, strict=not args.partial, progress=progress
    )
    return functools.partial(
        SwapAdapterResult,
        adapter=args.adapter,
        swapped=result.swapped,
        unmatched_modules=result.unmatched_modules,
        layers_without_adapter=result.layers_without_adapter,
    )


def _refuse_adapted_weights(model, target):
    """inject on a weight that already has a LoRA adapter is an error naming it (inject itself would leave
    that MatMul as it is, which is not what `--target` asked for)."""
    from tf_lora.rewrite import RewriteError, inspect
    from tf_lora.rewrite.graph_edit import name_matches

    pattern = re.compile(target)
    adapted = {}
    for entry in inspect(model)["adapters"]:
        if "weight" in entry and name_matches(pattern, entry["weight"]):
            adapted.setdefault(entry["weight"], []).append(entry["adapter"])
    if adapted:
        named = ", ".join(f"{weight} (adapter {', '.join(a)})" for weight, a in sorted(adapted.items()))
        raise RewriteError(
            f"nothing written; --target {target!r} matches weights that already have a LoRA adapter: "
            f"{named}; leave them out of --target, or fold the model first"
        )


def _pair(text):
    from tf_lora.rewrite import RewriteError

    pattern, sep, replacement = text.partition("=")
    if not sep:
        raise RewriteError(f"--map wants REGEX=REPLACEMENT, got {text!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise RewriteError(f"--map {text!r}: not a regular expression ({e})") from None
    return pattern, replacement


def _fail(args, message, exit_code):
    failure = Failure(args.command, message, exit_code)
    print(failure.text(), file=sys.stderr)
    if args.json:
        print(json.dumps(failure.to_json(), indent=2))
    return exit_code


def _without_prefix(command, message):
    """The library names the function that failed ("fold: ..."); the command line names it already."""
    prefix = f"{command}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _io_message(error):
    if isinstance(error, OSError):
        text = error.strerror or str(error)
        return f"{error.filename}: {text}" if error.filename else text
    return reason(error)


class _OutputNames:
    """Shows OUT where a message names a staging path beside it (`.OUT.tf_lora_*`, `..OUT.tf_lora_*`)."""

    def __init__(self, out):
        self.out, self.staging = out, None
        self._pattern = None
        if out is not None:
            real = os.path.realpath(out)
            parent, base = re.escape(os.path.dirname(real) + os.sep), re.escape(os.path.basename(real))
            # The library stages a rewrite of OUT's staging path as `..OUT.tf_lora_stage_N.tf_lora_tmp_N`.
            self._pattern = re.compile(parent + r"\.+" + base + r"\.tf_lora_[^\s'\",:;)\]]*")

    def clean(self, message):
        if self._pattern is None:
            return message
        if self.staging is not None:
            message = message.replace(self.staging, self.out)
        return self._pattern.sub(lambda _m: self.out, message)


def _import_library(verbose):
    """Imports tf_lora.rewrite, and with it TensorFlow, as quietly as asked (tf_lora._quiet): the C++ logs
    off and the import's stderr held back, unless --verbose or the user's TF_CPP_MIN_LOG_LEVEL say
    otherwise. Through the console script, `import tf_lora` has done this already."""
    with _quiet.tensorflow_start(verbose):
        import tf_lora.rewrite  # noqa: F401


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
            through = f" in {a['equation']!r}" if "equation" in a else f" ({a['op']})" if "op" in a else ""
            lines.append(
                f"  {a['adapter']} on {a['weight']} {a['weight_shape']}{through}: "
                f"rank {a['rank']}, scale {a['scale']:g}"
            )
    lines.append(f"MatMul candidates for an adapter: {len(report['matmul_candidates'])}")
    for m in report["matmul_candidates"]:
        view = f" as [in, out] {m['matrix']} ({m['op']})" if "op" in m else ""
        lines.append(f"  {m['weight']} {m['shape']}{view}  [{m['function']}/{m['node']}]")
    lines.append(f"Einsum candidates for an adapter: {len(report['einsum_candidates'])}")
    for m in report["einsum_candidates"]:
        view = f"as [in, out] {m['matrix']}" if "matrix" in m else f"no adapter: {m['not_injectable']}"
        lines.append(
            f"  {m['weight']} {m['shape']} in {m['equation']!r}, {view}  [{m['function']}/{m['node']}]"
        )
    lines.append(f"embedding lookups: {len(report['embedding_lookups'])}")
    for e in report["embedding_lookups"]:
        lines.append(f"  {e['op']} on {e['variable']} {e['shape']}  [{e['function']}/{e['node']}]")
    lines.append(f"sparse tables: {len(report['sparse_tables'])}")
    for t in report["sparse_tables"]:
        lines.append(f"  {t['name']} ({t['table']}, dim {t['dim']}): {t['ids']} ids, {len(t['pulls'])} pulls")
        lines.extend(f"    not densifiable: {use}" for use in t["other_uses"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
