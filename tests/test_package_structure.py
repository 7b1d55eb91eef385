"""The package's own rules, read from the source tree so that a new module is checked the day it lands:

- what two modules share has a public name: no module of tf_lora imports another module's `_private` name or
  reaches into one (`module._name`); private modules (`tf_lora._quiet`) may be imported by name;
- no import cycles between tf_lora's modules, counting imports inside functions;
- a name means one thing: a package binds no name over one of its own modules (`import tf_lora.rewrite.fold`
  giving a function), and no two modules share a file name.
"""

import ast
import collections
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tf_lora"


def _is_module(dotted):
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _violations(path):
    tree = ast.parse(path.read_text(), str(path))
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tf_lora"):
            for alias in node.names:
                name = alias.asname or alias.name
                if _is_module(f"{node.module}.{alias.name}"):
                    modules.add(name)
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tf_lora") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_module_s_private_names():
    found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in _violations(path)]
    assert not found, "private names used across modules (give what is shared a public name):\n" + "\n".join(
        found
    )


def test_the_rule_catches_what_it_is_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from tf_lora.adapters.peft import _x\nfrom tf_lora.python.ops import lora_ops\nlora_ops._y(1)\n"
    )
    assert len(_violations(sample)) == 2


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path):
    """The tf_lora modules a file imports anywhere in it (in functions too): `from P import x` imports
    module P.x where x is one, else P."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tf_lora"):
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                found.add(dotted if _is_module(dotted) else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tf_lora"))
    return found


def _cycles(graph):
    """Every cycle found by a depth-first search of {module: {modules it imports}}, each as a list."""
    cycles, state = [], {}
    stack = []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def _import_graph():
    return {
        _module_name(path): _imported_modules(path) - {_module_name(path)}
        for path in PACKAGE.rglob("*.py")
        if not path.name.startswith("gen_")
    }


def test_no_import_cycles():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    graph = _import_graph()
    assert "tf_lora.rewrite.model_files" in graph["tf_lora.rewrite.folding"]  # imports are seen


def _shadowing(init, root=PACKAGE.parent):
    """Names a package's __init__ binds over one of its own modules (`from <package> import module` binds the
    module itself, which is fine)."""
    package = init.parent
    dotted = ".".join(package.relative_to(root).parts)
    found = []
    for node in ast.walk(ast.parse(init.read_text(), str(init))):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name
                is_submodule = (package / f"{bound}.py").is_file() or (
                    package / bound / "__init__.py"
                ).is_file()
                if is_submodule and not (node.module == dotted and alias.name == bound):
                    found.append(f"{dotted}.{bound}")
    return found


def test_no_package_binds_a_name_over_its_own_module():
    found = [name for init in sorted(PACKAGE.rglob("__init__.py")) for name in _shadowing(init)]
    assert not found, f"names that are both a module and something else: {found}"


def test_the_shadowing_rule_catches_what_it_is_for(tmp_path):
    package = tmp_path / "tf_lora" / "pkg"
    package.mkdir(parents=True)
    (package / "fold.py").write_text("def fold(): pass\n")
    (package / "inspection.py").write_text("def inspect(): pass\n")
    (package / "__init__.py").write_text(
        "from tf_lora.pkg import fold as fold\nfrom tf_lora.pkg.fold import fold\n"
        "from tf_lora.pkg.inspection import inspect\n"
    )
    assert _shadowing(package / "__init__.py", root=tmp_path) == ["tf_lora.pkg.fold"]


def test_no_two_modules_share_a_file_name():
    names = collections.Counter(
        path.name
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and not path.name.startswith("gen_")
    )
    assert not [n for n, count in names.items() if count > 1]


def test_import_tf_lora_leaves_the_rewrites_until_used(run_python):
    out = run_python(
        "import sys, tf_lora\n"
        "print('tf_lora.rewrite' in sys.modules)\n"
        "fold = tf_lora.rewrite.fold\n"
        "print('tf_lora.rewrite' in sys.modules, fold.__module__)\n"
    )
    assert out.split() == ["False", "True", "tf_lora.rewrite.folding"]
