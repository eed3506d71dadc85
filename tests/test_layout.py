"""The package layout that trust_remote_code depends on: `amoeba_hf/modeling/` is exactly what a checkpoint carries.

Every `.py` file of that folder (but `__init__.py`) is copied into each saved checkpoint and runs where amoeba_hf is
not installed, so those files may import only torch, transformers, the standard library and each other
(`from .module import Name`, the only relative form transformers copies). The Hub and file-writing layer
(`amoeba_hf/hub.py`, `amoeba_hf/io.py`) stays at home.
"""

import ast
import sys
from pathlib import Path

import pytest
from conftest import tiny_source

from amoeba_hf import AmoebaForCausalLM

MODELING = Path(__file__).resolve().parents[1] / "amoeba_hf" / "modeling"
ALLOWED_PACKAGES = {"torch", "transformers"}
# Imports outside ALLOWED_PACKAGES that a travelling file may still make, each with its reason.
ALLOWED_MODULES = {
    "huggingface_hub.dataclasses": "the @strict config decorator that transformers' own configs (LlamaConfig) use; "
    "huggingface_hub is a dependency of transformers, so it adds no requirement",
}


def travelling_files() -> set[str]:
    """The files a saved any-shape checkpoint must carry: the modeling folder's modules."""
    return {path.name for path in MODELING.glob("*.py") if path.name != "__init__.py"}


def test_saved_checkpoint_carries_exactly_the_modeling_files(tmp_path):
    AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.glob("*.py")} == travelling_files()
    for name in travelling_files():
        assert (tmp_path / name).read_bytes() == (MODELING / name).read_bytes(), name


def import_problems(path: Path, siblings: set[str]) -> list[str]:
    """Every import of `path`, nested ones included, that would not work in a checkpoint loaded without amoeba_hf."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.ImportFrom):
            if node.level != 1 or node.module not in siblings:
                names = ", ".join(alias.name for alias in node.names)
                problems.append(f"{where}: from {'.' * node.level}{node.module or ''} import {names} does not travel "
                                "(only `from .module import Name` of a sibling is copied)")
            continue
        else:
            continue
        for module in modules:
            root = module.split(".")[0]
            if root not in ALLOWED_PACKAGES and root not in sys.stdlib_module_names and module not in ALLOWED_MODULES:
                problems.append(f"{where}: imports {module}, which a checkpoint loaded without amoeba_hf may lack")
    return problems


def siblings() -> set[str]:
    return {name.removesuffix(".py") for name in travelling_files()}


@pytest.mark.parametrize("name", sorted(travelling_files()))
def test_travelling_file_imports_only_torch_transformers_stdlib_and_its_siblings(name):
    assert import_problems(MODELING / name, siblings()) == []


def test_import_check_catches_what_does_not_travel(tmp_path):
    """Imports anywhere in a file, third-party packages, and the relative forms transformers does not copy."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nimport huggingface_hub\nfrom . import shape_space\nfrom .hub import push_folder\n"
        "from .shape_space import ShapeSpace\n\ndef f():\n    from amoeba_hf.io import save_checkpoint\n"
    )
    problems = import_problems(bad, siblings())
    assert [problem.split(":")[1] for problem in problems] == ["2", "3", "4", "8"], problems


def test_hub_and_file_writing_layer_stays_at_home():
    import amoeba_hf.hub
    import amoeba_hf.io

    assert not (MODELING / "hub.py").exists() and not (MODELING / "atomic_io.py").exists()
    assert Path(amoeba_hf.hub.__file__).parent == MODELING.parent == Path(amoeba_hf.io.__file__).parent
