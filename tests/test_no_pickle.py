"""No pickle anywhere: weights are safetensors, configs and state are JSON.

Unpickling runs arbitrary code, so a model folder from a stranger must never be read
with it.  The check reads the source's syntax tree (comments and docstrings may talk
about pickle; code may not use it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import dalle

PACKAGE = Path(dalle.__file__).parent
ROOT = PACKAGE.parent
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "scripts").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLING_CALLS = {("torch", "save"), ("torch", "load")}
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".joblib"}


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLING_MODULES:
                found.append(f"{where} imports from {node.module}")
            if module == "torch" and any(a.name in ("save", "load") for a in node.names):
                found.append(f"{where} imports torch.save/torch.load")
        elif isinstance(node, (ast.Attribute, ast.Name)):
            name = _dotted(node)
            if name[:2] in PICKLING_CALLS:
                found.append(f"{where} uses {'.'.join(name)}")
        if isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "weights_only"):
            if isinstance(node.value, ast.Constant) and node.value.value is (node.arg == "allow_pickle"):
                found.append(f"{where} passes {node.arg}={node.value.value}")
    return found


def test_sources_are_found():
    assert PACKAGE / "io.py" in SOURCES and len(SOURCES) > 20


# The one exception: the reader of other projects' released pickles, which subclasses
# pickle.Unpickler with a find_class that rebuilds tensors and plain containers only.
SAFE_READER = PACKAGE / "convert" / "safe_pickle.py"


def test_no_source_file_pickles():
    found = [v for path in SOURCES for v in _violations(path)]
    found = [v for v in found if not (v.startswith(str(SAFE_READER.relative_to(ROOT)) + ":") and v.endswith("imports pickle"))]
    assert not found, "pickle-based (de)serialisation is forbidden; use safetensors + JSON:\n" + "\n".join(found)


def test_the_checker_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nfrom torch import load\n"
                   "x = torch.load('w.pt')  # a comment about pickle is fine\ntorch.save(x, 'w.pt')\nimport numpy as np\nnp.load('a', allow_pickle=True)\n")
    found = _violations(bad, root=tmp_path)
    assert len(found) == 5, found


def test_package_data_holds_no_pickled_weights():
    shipped = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    assert not shipped, f"pickle-format files in the package: {shipped}"


def test_the_safe_reader_uses_pickle_only_through_a_restricted_unpickler():
    tree = ast.parse(SAFE_READER.read_text(encoding="utf-8"))
    used = {_dotted(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _dotted(n)[:1] == ("pickle",)}
    assert used <= {("pickle", "Unpickler"), ("pickle", "UnpicklingError")}, used
    unpicklers = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and any(_dotted(b) == ("pickle", "Unpickler") for b in n.bases)]
    assert len(unpicklers) == 1
    methods = {f.name for f in unpicklers[0].body if isinstance(f, ast.FunctionDef)}
    assert {"find_class", "persistent_load"} <= methods
