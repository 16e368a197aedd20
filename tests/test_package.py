"""The package as a whole: no import cycle among fastnn's modules."""
import ast
import pathlib

import fastnn

ROOT = pathlib.Path(fastnn.__file__).parent


def module_name(path):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, modules):
    """The fastnn modules `path` imports anywhere (function-level imports too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
    # A module's parent packages run before it anyway: importing them adds no edge.
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in modules and m != name and m not in ancestors}


def import_graph():
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    mod = tmp_path / "pkg" / "one.py"
    mod.write_text("def f():\n    from pkg import two\n    from . import three\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path / "pkg"
    try:
        assert imports_of(mod, {"pkg", "pkg.one", "pkg.two", "pkg.three"}) == {"pkg.two",
                                                                               "pkg.three"}
    finally:
        ROOT = saved


def test_no_import_cycle_among_fastnn_modules():
    graph = import_graph()
    assert "fastnn.runs" in graph["fastnn.tune"] and "fastnn.runs" in graph["fastnn.cli.train"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


WITHOUT_NUMBA = """
import sys, warnings
import numpy as np

class Blocked:  # numba and llvmlite as in a broken install: importing them fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numba", "llvmlite"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Blocked())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastnn
    import fastnn.layers, fastnn.fast_layers, fastnn.layer_utils, fastnn.optim
    import fastnn.classifiers, fastnn.solver, fastnn.gradient_check, fastnn.data
from fastnn import kernels
from fastnn.classifiers import ConvNet
from fastnn.runs import setup_runtime
assert not caught, [str(w.message) for w in caught]  # the contract's modules import silently
assert "Numba cannot be imported" in kernels.registry.unavailable["numpy"]
assert kernels.for_module(np).name == "numpy-reference", kernels.for_module(np).name
setup_runtime({"backend": "numpy"})  # a command on numpy says it (stderr) and what to do
x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
loss, grads = ConvNet(widths=(4,), stem_width=4, input_dim=(3, 8, 8), seed=0).loss(x, np.array([1, 2]))
assert np.isfinite(loss) and fastnn.get_num_threads() >= 1
print("ok")
"""


def test_fastnn_imports_and_runs_its_references_without_numba():
    """A broken Numba (llvmlite missing, say) costs speed, not the package: the contract's
    modules import without a word (even under -W error), the numpy backend runs the
    reference ops, and the commands say why on stderr (runs.setup_runtime) and what to do."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-W", "error", "-c", WITHOUT_NUMBA],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    said = result.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("fastnn: Numba cannot be imported"), said
    assert "pip install --force-reinstall numba" in said[0]
