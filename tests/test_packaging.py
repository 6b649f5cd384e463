"""pyproject.toml stays consistent with the tree: every console command names a ``main`` that exists, every package
and data file is listed, and the dependencies are read from requirements.txt (offline, no build; < 1 s)."""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _top_level_functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_dependencies_are_read_from_requirements(pyproject):
    assert "dependencies" not in pyproject["project"]  # only the dynamic source, so the two lists cannot differ
    assert "dependencies" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert pins and all("==" in line and " #" not in line for line in pins)  # setuptools reads plain lines only


def test_console_commands_name_existing_main_functions(pyproject):
    modules = set(pyproject["tool"]["setuptools"]["py-modules"])
    scripts = pyproject["project"]["scripts"]
    assert len(scripts) >= 8
    for command, target in scripts.items():
        module, _, func = target.partition(":")
        assert module in modules, f"{command}: {module} is not a listed py-module"
        functions = _top_level_functions(ROOT / f"{module}.py")
        assert func in functions, f"{command}: {module}.py has no top-level {func}()"
        args = functions[func].args
        # console scripts call main() without arguments
        assert len(args.defaults) == len(args.args) and not args.kwonlyargs, f"{command}: {func}() needs arguments"


def test_every_script_package_and_data_file_is_listed(pyproject):
    setup = pyproject["tool"]["setuptools"]
    scripts = {p.stem for p in ROOT.glob("*.py") if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8")}
    assert scripts <= set(setup["py-modules"]), scripts - set(setup["py-modules"])
    assert all((ROOT / f"{m}.py").is_file() for m in setup["py-modules"])
    found = {init.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for top in ("models", "utils") for init in (ROOT / top).rglob("__init__.py")}
    assert found == set(setup["packages"])
    data = setup.get("package-data", {})
    for package in setup["packages"]:
        folder = ROOT / package.replace(".", "/")
        for path in folder.rglob("*"):
            rel = path.relative_to(folder).as_posix()
            if (path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in rel
                    and not any((ROOT / p.replace(".", "/")) in path.parents and p != package
                                for p in setup["packages"])):
                assert any(fnmatch.fnmatch(rel, pat) for pat in data.get(package, [])), f"{package}: {rel} not shipped"
