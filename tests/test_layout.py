"""The package layout: imports point one way (no cycles, no upward imports), optional extras stay in their rooms.

Every import counts, at module level or inside a function (a lazy import is still a
dependency); only ``if TYPE_CHECKING:`` blocks are skipped, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "balcony"

# Lower layers never import higher ones; rooms of one layer never import each other.
LAYERS = {
    "balcony._version": 0,
    "balcony.metrics": 0,
    "balcony.inference": 1,
    "balcony.modeling": 2,
    "balcony.training": 3,
    "balcony.eval": 3,
    "balcony.bench": 3,
    "balcony.serving": 3,
    "balcony.vllm": 3,  # export + vLLM plugin: reads modeling; only its own modules import vllm
    "balcony.studies": 3.5,  # ablation studies: train (training) and score (eval) variants
    "balcony.cli": 4,
    "balcony": 5,  # the package root re-exports the public API
}
# Heavy optional dependencies and the only rooms that may import them.
OPTIONAL = {
    "fastapi": ("balcony.serving",),
    "uvicorn": ("balcony.cli.serve",),
    "starlette": ("balcony.serving",),
    "lm_eval": ("balcony.eval",),
    "matplotlib": ("balcony.eval.plots", "balcony.bench.report", "balcony.studies.figure"),
    "vllm": ("balcony.vllm",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The layer key a module belongs to (its subpackage, or a top-level module)."""
    for key in sorted(LAYERS, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    raise AssertionError(f"{module} is in no layer of {sorted(LAYERS)}: add its subpackage to LAYERS")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every runtime import in `path` (submodules resolved)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{target}.{a.name}"
                is_sub = (SRC.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (SRC.parent / Path(*sub.split(".")) / "__init__.py").is_file()
                out.append((sub if is_sub else target, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    return {module_name(p): [(m, n) for m, n in imports_of(p) if m == "balcony" or m.startswith("balcony.")] for p in sorted(SRC.rglob("*.py"))}


def test_every_module_is_in_a_layer_and_imports_point_down():
    bad = []
    for mod, deps in graph().items():
        mine = room(mod)
        for dep, line in deps:
            theirs = room(dep)
            if theirs == mine:
                continue
            if LAYERS[theirs] > LAYERS[mine]:
                bad.append(f"{mod}:{line} imports {dep} (layer {LAYERS[theirs]} > {LAYERS[mine]})")
            elif LAYERS[theirs] == LAYERS[mine]:
                bad.append(f"{mod}:{line} imports {dep}: {mine} and {theirs} are rooms of one layer and must not depend on each other")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    g = {m: sorted({d for d, _ in deps if d in graph_modules()}) for m, deps in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in g.get(m, []):
            if d == m:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                cycle = visit(d)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in g:
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def graph_modules() -> set[str]:
    return {module_name(p) for p in SRC.rglob("*.py")}


def test_the_check_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The layering test is not vacuous: an inference module importing the CLI is reported."""
    fake = tmp_path / "balcony"
    for p in SRC.rglob("*.py"):
        dest = fake / p.relative_to(SRC)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(p.read_text())
    (fake / "inference" / "sampling.py").write_text((fake / "inference" / "sampling.py").read_text() + "\n\ndef _f():\n    from ..cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    with pytest.raises(AssertionError, match=r"balcony.inference.sampling:\d+ imports balcony.cli"):
        test_every_module_is_in_a_layer_and_imports_point_down()


def test_optional_dependencies_stay_in_their_rooms():
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        mod = module_name(p)
        for dep, line in imports_of(p):
            top = dep.split(".")[0]
            if top in OPTIONAL and not any(mod == r or mod.startswith(r + ".") for r in OPTIONAL[top]):
                bad.append(f"{mod}:{line} imports {dep} (allowed only in {OPTIONAL[top]})")
    assert not bad, "\n".join(bad)


def test_core_imports_without_the_optional_extras():
    """`import balcony`, the CLI's parser and the core (and `balcony.vllm`'s export) run with fastapi, uvicorn, lm-eval, matplotlib and vLLM missing."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'lm_eval', 'matplotlib', 'vllm'):\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import balcony, balcony.cli, balcony.training, balcony.eval, balcony.bench, balcony.vllm\n"
        "from balcony.cli import build_parser\n"
        "build_parser().parse_args(['generate', 'hi'])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_modules_are_small_and_say_what_they_own():
    long, undocumented = [], []
    for p in sorted(SRC.rglob("*.py")):
        n = len(p.read_text().splitlines())
        if n > 500:
            long.append(f"{module_name(p)} ({n} lines)")
        doc = ast.get_docstring(ast.parse(p.read_text()))
        if not doc or not doc.splitlines()[0].strip():
            undocumented.append(module_name(p))
    assert not long, f"modules over 500 lines: {long}"
    assert not undocumented, f"modules without a docstring saying what they own: {undocumented}"
