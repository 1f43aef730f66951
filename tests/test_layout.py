"""The project's top-level modules must not shadow an installed package.

Scripts run from the repository root put it first on sys.path, so a folder or file here named
like a dependency's module hides that module from every import, the dependency's own included
(transformers 5.25 imports the PyPI package `kernels`; a `kernels/` folder here broke it).
"""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_top_level_modules() -> set[str]:
    names = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    names |= {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
    return names


def test_no_top_level_module_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in our_top_level_modules() if name in installed}
    assert not clashes, f"top-level modules of ours shadow installed packages: {clashes}"


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, "-c", "from transformers import LlamaForCausalLM; import model, policy"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
