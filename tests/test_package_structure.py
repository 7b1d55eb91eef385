"""The package's own rule: what two modules share has a public name. No module of tf_lora imports another
module's `_private` name or reaches into one (`module._name`); private modules (`tf_lora._quiet`) may be
imported by name. Read from the source tree, so a new module is checked the day it lands."""

import ast
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
