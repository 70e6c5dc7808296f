"""How the package is put together: dependencies point down, no import cycles, no
function-local imports of jaxdit modules (the usual way to hide a cycle), presets in
``experiments/``. Reads the sources only (no jaxdit import)."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "jaxdit")

# Higher may import lower, never the reverse (the developers' guide: cli -> train ->
# eval/data/diffusion -> models -> kernels/moe -> parallel). ``convert`` sits above models
# (weight I/O), ``config_lib`` above models (it checks fields against the families).
RANK = {"cli": 7, "train": 6, "eval": 5, "convert": 5, "data": 4, "diffusion": 4,
        "config_lib": 4, "config_doc": 5, "models": 3, "kernels": 2, "moe": 2,
        "parallel": 1, "errors": 0}
# ``python -m jaxdit.<x>`` shims that only hand over to their command in cli/.
ENTRY_POINTS = {"__main__", "train.__main__", "eval.__main__", "convert.__main__", "cache",
                "compile", "sample"}


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__").removesuffix("__init__"), path


def _jaxdit_imports(tree) -> list[tuple[ast.AST, str]]:
    """(node, module path below jaxdit) of every ``jaxdit`` import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "jaxdit" or node.module.startswith("jaxdit.")):
            base = node.module.removeprefix("jaxdit").lstrip(".")
            for alias in node.names:
                found.append((node, f"{base}.{alias.name}" if base else alias.name))
        elif isinstance(node, ast.Import):
            found += [(node, a.name.removeprefix("jaxdit.")) for a in node.names
                      if a.name.startswith("jaxdit.")]
    return found


def _parsed():
    return {mod: ast.parse(open(path, encoding="utf-8").read()) for mod, path in _modules()}


def test_dependencies_point_down():
    upward = []
    for mod, tree in _parsed().items():
        if mod in ENTRY_POINTS or not mod:
            continue
        own = mod.split(".")[0]
        for node, target in _jaxdit_imports(tree):
            other = target.split(".")[0]
            if other != own and RANK.get(other, -1) >= RANK.get(own, 99):
                upward.append(f"jaxdit/{mod.replace('.', '/')}.py:{node.lineno} imports "
                              f"jaxdit.{target}")
    assert not upward, "\n".join(upward)
    assert set(RANK) >= {m.split(".")[0] for m, _ in _modules() if m} - ENTRY_POINTS


def test_no_function_local_jaxdit_imports():
    """Optional third-party packages may be imported where used; jaxdit modules never."""
    local = []
    for mod, tree in _parsed().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local += [f"{mod}:{node.lineno} jaxdit.{target}"
                          for node, target in _jaxdit_imports(fn)]
    assert not local, local


def test_no_import_cycles():
    modules = dict(_modules())
    graph = {}
    for mod, tree in _parsed().items():
        deps = set()
        for _, target in _jaxdit_imports(tree):
            # ``from jaxdit.x import name``: the module x.name if it is one, else x
            deps.add(target if target in modules else target.rpartition(".")[0])
        graph[mod] = {d for d in deps if d in modules and d != mod}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycle.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycle, " -> ".join(cycle[0])


def test_presets_live_in_the_experiment_files():
    """``jaxdit/config_lib.py`` holds shared building blocks only; every family's sizes and
    tiny recipe are in its ``experiments/<family>.py``."""
    tree = ast.parse(open(os.path.join(PACKAGE, "config_lib.py"), encoding="utf-8").read())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not {n for n in names if n.endswith("_config") and n != "base_config"}, names
    for name in ("dit_air", "race_dit", "lumina", "d2it", "vae"):
        source = open(os.path.join(REPO, "experiments", f"{name}.py"), encoding="utf-8").read()
        assert "_SIZES" in source or "AIR_DEPTHS" in source or name == "vae", name
