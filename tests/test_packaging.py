"""What a fresh `pip install .` brings must cover every third-party module the package imports."""

import ast
import configparser
import re
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "amoeba_hf"

# Modules served by an optional extra, and the only files allowed to import them.
EXTRA_MODULES = {"lm_eval": ("eval", {"evaluation/lm_eval_model.py"})}


def _requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line.strip())[0].lower().replace("_", "-")


def _install_closure() -> set[str]:
    """Distributions that `install_requires` brings, with everything they require in turn (extras excluded)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    todo = [_requirement_name(line) for line in config["options"]["install_requires"].splitlines() if line.strip()]
    closure: set[str] = set()
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            todo += [_requirement_name(r) for r in requires(name) or [] if "extra ==" not in r]
        except PackageNotFoundError:
            pass
    return closure


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files of amoeba_hf that import it (absolute imports only, at any depth)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != "amoeba_hf":
                    found.setdefault(top, set()).add(path.relative_to(PACKAGE).as_posix())
    return found


def test_every_imported_third_party_module_is_declared():
    closure = _install_closure()
    distributions = packages_distributions()
    undeclared = []
    for module, files in sorted(_third_party_imports().items()):
        if module in EXTRA_MODULES:
            extra, allowed = EXTRA_MODULES[module]
            assert files <= allowed, f"{module} (extra {extra!r} only) imported by {sorted(files - allowed)}"
            continue
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if not names & closure:
            undeclared.append(f"{module} (imported by {', '.join(sorted(files))})")
    assert not undeclared, f"not brought by install_requires: {undeclared}"


def test_the_import_walk_sees_the_imports_it_checks():
    """Guard against a walk that finds nothing and so passes vacuously."""
    imports = _third_party_imports()
    assert {"torch", "transformers", "datasets", "lm_eval"} <= set(imports)
    assert {"torch", "transformers", "accelerate", "datasets", "safetensors"} <= _install_closure()


def test_the_wheel_ships_the_bundled_text_and_its_licence(tmp_path):
    """`amoeba build` without `--data` reads amoeba_hf/data/c4_sample.jsonl: a non-editable install must carry it."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(tmp_path), str(ROOT)], check=False, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("amoeba_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shipped = archive.read("amoeba_hf/data/c4_sample.jsonl")
    assert {"amoeba_hf/data/__init__.py", "amoeba_hf/data/README.md"} <= names
    assert shipped == (PACKAGE / "data" / "c4_sample.jsonl").read_bytes()
