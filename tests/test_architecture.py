"""The layering rules of docs/architecture.md, checked on the source: the reference model imports
no fast path, importing olmoe changes nothing global, and nothing in the library imports the
command line."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import olmoe
from tests.conftest import modules_imported_by

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


@pytest.mark.parametrize("package", ["olmoe", "olmoe.data"])
def test_lazy_names_are_what_the_package_declares(package):
    """Names that load on first use (olmoe.lazy); the TYPE_CHECKING imports (what editors see)
    name the same objects, also once their modules are imported (where a submodule of the same
    name would shadow a function)."""
    module = importlib.import_module(package)
    declared = {}
    source = Path(module.__file__).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imported in node.body:
                for alias in imported.names:
                    declared[alias.asname or alias.name] = (imported.module, alias.name)
    assert declared == module._EXPORTS
    assert set(declared) <= set(module.__all__) <= set(dir(module))
    for name, (defining, attribute) in declared.items():
        expected = getattr(importlib.import_module(defining), attribute)
        assert getattr(module, name) is expected, name
    for name in module.__all__:
        assert not inspect.ismodule(getattr(module, name)), name
    with pytest.raises(AttributeError, match="no attribute 'Missing'"):
        module.Missing  # noqa: B018


def test_the_tokenizer_and_data_preparation_load_without_torch():
    """`olmoe data prepare` and `olmoe data chat` tokenise without importing torch."""
    preparation = "import olmoe.tokenizer, olmoe.data, olmoe.data.chat"
    assert modules_imported_by(preparation, ["torch", "transformers"]) == []


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
