"""Imports point down the data flow (DESIGN.md §1): a package may import only the packages its row allows.
The test reads every module's import statements (top level and inside functions) and fails on any other
edge, so an upward import cannot creep back in. It also imports every module on its own, in a fresh
interpreter, so that no module works only because another was imported first (an import cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import featurekit

ROOT = Path(featurekit.__file__).parent
BASE = {"errors", "_io"}  # shared helpers every package may use
#: package (or top-level module) → the featurekit packages it may import, besides itself and BASE
ALLOWED: dict[str, set[str]] = {
    "errors": set(), "_io": set(),
    "models": set(),
    "data": {"models"},
    "dictionaries": set(),
    "config": {"dictionaries"},
    "train": {"dictionaries", "config", "data"},
    "evaluate": {"dictionaries", "models", "data"},
    "features": {"dictionaries", "models", "data", "evaluate"},
    "report": {"features"},
    "rundir": set(),
    "pipeline": {"models", "data", "dictionaries", "config", "train", "evaluate", "features", "report", "rundir", "interop",
                 "circuits", "vision"},  # circuit_sets: trains transcoder sets, writes their manifest; vision runs
    "bench": {"models", "data", "dictionaries", "config", "train", "evaluate", "features", "pipeline"},
    "app": {"models", "data", "dictionaries", "config", "evaluate", "features", "pipeline", "report", "rundir", "circuits",
            "vision"},  # app/vision.py: heat-maps of a vision run's features
    # autointerp reads runs like bench does (pipeline: the run's config, model and token stream); only run.py imports it
    "autointerp": {"models", "data", "dictionaries", "config", "features", "pipeline", "rundir"},
    "cli": {"models", "data", "dictionaries", "config", "train", "evaluate", "features", "report", "rundir", "pipeline", "bench", "app",
            "autointerp", "interop", "circuits", "moex", "vision"},
    "__main__": {"cli"},
    "interop": {"dictionaries", "models"},
    "circuits": {"models", "data", "dictionaries", "evaluate", "features"},
    # MoE-X: its trainer (checkpoints, schedule, run folder), chess data and comparison; the LM itself is
    # models/moexlm (so models.load_model reads a run folder by name); compare/ trains a TopK SAE
    # (dictionaries, config, train) on a dense model's MLP for the comparison
    "moex": {"train", "rundir", "models", "dictionaries", "config"},
    "vision": {"models", "data", "dictionaries"},  # a ViT's sites, image sources, harvest, the vision splice
    "__init__": {"data", "dictionaries", "interop"},  # the top-level package: featurekit.load, featurekit.tokenize
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(path: Path) -> list[tuple[str, int]]:
    """(featurekit module, line) of every import in the file, relative ones resolved."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(name, node.lineno) for name in names if name == "featurekit" or name.startswith("featurekit.")]
    return out


def test_every_import_points_down_the_flow():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        source = group(module_name(path))
        assert source in ALLOWED, f"{path.relative_to(ROOT)}: package {source!r} has no row in ALLOWED; give it one"
        for target, line in imported(path):
            to = group(target)
            if not (ROOT / to).is_dir() and not (ROOT / f"{to}.py").is_file():
                to = "__init__"  # a name of the top-level package itself (featurekit.__version__)
            if to != source and to not in ALLOWED[source] | BASE | {"__init__"}:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({source} → {to})")
    assert not upward, "imports against the flow:\n" + "\n".join(upward)


def test_every_module_imports_on_its_own():
    modules = sorted(module_name(p) for p in ROOT.rglob("*.py") if p.name != "__main__.py")
    script = ("import importlib, sys\nbad = []\nfor m in sys.argv[1:]:\n"
              "    for k in [k for k in sys.modules if k == 'featurekit' or k.startswith('featurekit.')]:\n        del sys.modules[k]\n"
              "    try:\n        importlib.import_module(m)\n"
              "    except Exception as e:\n        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
              "print('\\n'.join(bad))")
    done = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
