"""The shape of the code, checked: no import circle among embedjob's modules (function-level
imports and ``if TYPE_CHECKING:`` imports count: a type hint is an arrow too), no stage importing
the job's config, no module over 450 lines nor function over 100, the ground floor imports nothing of embedjob, and ruff
is clean (the command line's own checks: tests/test_cli.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "embedjob"
MAX_LINES = 450
MAX_FUNCTION_LINES = 100
GROUND_FLOOR = ("errors", "schema", "layout", "redact", "debug", "_config_base")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """embedjob modules ``module`` imports anywhere (top level, in functions, under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(name: str) -> None:
        while name and name not in known:  # `from embedjob.x import y` may name a module or a symbol
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("embedjob"):
                        resolve(a.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module if is_pkg else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                if base.startswith("embedjob"):
                    for a in child.names:
                        full = f"{base}.{a.name}"
                        resolve(full if full in known else base)
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(p, m, known) for m, p in mods.items()}
    for m in graph:  # importing a.b.c runs a/__init__ and a/b/__init__ first: not an edge of a.b.c's own
        graph[m] = {d for d in graph[m] if not (m.startswith(d + ".") and d in known)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_circle():
    cycles = _cycles(_graph())
    assert not cycles, "import circles among embedjob modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_stage_imports_the_job_config():
    """A stage receives its own section (``run_index(icfg, ...)``), never ``JobConfig``: no module
    under ``embedjob.stages`` imports ``embedjob.config``, not even for a type hint."""
    graph = _graph()
    up = sorted(m for m, deps in graph.items() if m.startswith("embedjob.stages") and "embedjob.config" in deps)
    assert not up, f"stage modules importing embedjob.config: {up}"


def test_import_graph_sees_type_checking_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from embedjob.config import JobConfig\n")
    assert _imports(mod, "embedjob.stages.m", {"embedjob.config", "embedjob.stages.m"}) == {"embedjob.config"}


def test_ground_floor_imports_nothing_of_embedjob():
    graph = _graph()
    for name in GROUND_FLOOR:
        assert not graph[f"embedjob.{name}"], f"embedjob.{name} imports {sorted(graph[f'embedjob.{name}'])}"


def test_no_module_over_450_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _long_functions(path: Path, root: Path = PKG.parent) -> dict[str, int]:
    """``file:function`` -> lines (decorators excluded, docstring included) of each function over the cap."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {f"{path.relative_to(root)}:{node.name}": n for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES}


def test_no_function_over_100_lines():
    long = {k: n for p in PKG.rglob("*.py") for k, n in _long_functions(p).items()}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_function_length_check_finds_a_long_function(tmp_path):
    (tmp_path / "m.py").write_text("def short():\n    pass\n\n\ndef long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert _long_functions(tmp_path / "m.py", tmp_path) == {"m.py:long": MAX_FUNCTION_LINES + 1}


# What a function-level import of an embedjob module may defer: a heavy library (or pydantic: the
# encoder runs on .ci/gpu-check's bare GPU host without it, and `embedjob --help` stays light).
DEFERRED = {"torch", "transformers", "sentence_transformers", "faiss", "gensim", "ray", "lance", "matplotlib",
            "openvino", "pydantic"}
# .ci/gpu-check's own modules run on a host with only torch, transformers and numpy: they import
# the rest (pyarrow for --feed) where it is used.
BARE_HOST = {"embedjob.bench.gpu_check", "embedjob.bench.gpu_feed"}


def _top_and_local_imports(path: Path, module: str, known: set[str]):
    """(embedjob modules and DEFERRED libraries imported when ``module`` is imported, and
    [(line, embedjob module)] imported inside functions). ``if TYPE_CHECKING`` never runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top: set[str] = set()
    local: list[tuple[int, str]] = []

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            p = pkg
            for _ in range(node.level - 1):
                p = p.rpartition(".")[0]
            base = f"{p}.{base}" if base else p
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in targets(child):
                    if name.startswith("embedjob"):
                        while name not in known:
                            name = name.rpartition(".")[0]
                        if in_function:
                            local.append((child.lineno, name))
                        else:
                            top.add(name)
                    elif not in_function and name.split(".")[0] in DEFERRED:
                        top.add(name.split(".")[0])
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, local


def test_function_level_imports_defer_a_heavy_library():
    """A ``from embedjob...`` import inside a function is there only when the module it imports
    loads (itself or through its imports, at import time) a library of DEFERRED that the importing
    module does not load already; any other belongs at the top of the module."""
    mods = _modules()
    known = set(mods)
    scanned = {m: _top_and_local_imports(p, m, known) for m, p in mods.items()}

    def parents(m: str) -> set[str]:
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))} & known

    loads: dict[str, set[str]] = {}

    def heavy(m: str) -> set[str]:
        if m not in loads:
            loads[m] = set()  # a circle through packages ends here
            top = scanned[m][0] | parents(m)
            loads[m] = {x for x in top if x in DEFERRED}.union(*(heavy(d) for d in top if d in known and d != m))
        return loads[m]

    needless = [f"{mods[m].relative_to(PKG.parent)}:{line} imports {t}" for m in mods if m not in BARE_HOST
                for line, t in scanned[m][1] if t != m and not heavy(t) - heavy(m)]
    assert not needless, "function-level imports that defer no heavy library:\n" + "\n".join(needless)


def test_the_job_config_loads_no_gensim():
    """``PreprocessConfig`` is pydantic only: reading a job's config loads neither gensim nor torch nor Ray."""
    import subprocess
    import sys

    code = ("import sys\nimport embedjob.config\n"
            "print('LOADED', sorted(m for m in ('gensim', 'torch', 'ray') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LOADED []" in res.stdout, res.stdout[-2000:]


def test_ruff_is_clean():
    """`ruff check` (configured in pyproject.toml) finds nothing."""
    import subprocess
    import sys

    assert "[tool.ruff" in (PKG.parent / "pyproject.toml").read_text(encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(PKG.parent)],
                         capture_output=True, text=True, cwd=PKG.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
