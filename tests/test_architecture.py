"""The layering rules of docs/architecture.md, checked on the source: the reference model imports
no fast path, importing olmoe changes nothing global, and nothing in the library imports the
command line."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import olmoe

PACKAGE = Path(olmoe.__file__).parent
# The reference: plain PyTorch, which the engine is applied to from outside.
REFERENCE = ("config.py", "model.py", "moe.py", "quantize.py", "cache.py", "outputs.py")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_package_exports_what_it_declares():
    """Its names load on first use; the TYPE_CHECKING imports (what editors see) name the same
    objects."""
    declared = {}
    for node in ast.parse((PACKAGE / "__init__.py").read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imported in node.body:
                for alias in imported.names:
                    declared[alias.asname or alias.name] = (imported.module, alias.name)
    assert declared == olmoe._EXPORTS
    for name, (module, attribute) in declared.items():
        assert getattr(olmoe, name) is getattr(importlib.import_module(module), attribute)
        assert name in dir(olmoe)
    with pytest.raises(AttributeError, match="no attribute 'Missing'"):
        olmoe.Missing  # noqa: B018


def test_the_reference_model_imports_no_fast_path():
    for name in REFERENCE:
        imports = imported_modules(PACKAGE / name)
        assert not {i for i in imports if i.startswith(("olmoe.engine", "olmoe.kernels"))}, name
    for name in ("model.py", "moe.py"):  # not even a mention
        assert "kernels" not in (PACKAGE / name).read_text(), name


def test_no_library_module_imports_the_command_line():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "cli" or path.name == "__main__.py":  # the entry points
            continue
        imports = imported_modules(path)
        assert not {i for i in imports if i == "olmoe.cli" or i.startswith("olmoe.cli.")}, path


def test_importing_olmoe_registers_no_global_hooks():
    for module in pkgutil.walk_packages(olmoe.__path__, "olmoe."):
        if module.name.startswith("olmoe.benchmarks") or module.name == "olmoe.__main__":
            continue  # peers of the bench extra; the command itself
        importlib.import_module(module.name)
    hooks = torch.nn.modules.module
    for table in (
        "_global_module_registration_hooks",
        "_global_parameter_registration_hooks",
        "_global_buffer_registration_hooks",
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
    ):
        assert not getattr(hooks, table), table
