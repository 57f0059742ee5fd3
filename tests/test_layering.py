"""The package's layers: every import in quipjax/ (function-local ones too) goes to the same
or a lower layer, no import cycle, no module uses another module's private (_name)
attribute. The checker is tested on a synthetic package with one violation of each kind."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# module (or package prefix) -> layer; the longest matching prefix wins
LAYERS = {
    # L0 numerics: arrays in, arrays out
    "quipjax.hadamard": 0, "quipjax.rht": 0, "quipjax.hessian": 0, "quipjax.codebooks": 0,
    "quipjax.ldlq": 0, "quipjax.quantize": 0, "quipjax.group": 0, "quipjax.kernels": 0,
    "quipjax.rule": 0,
    "quipjax.formats": 0, "quipjax.formats.quipsharp.packing": 0,
    # L1 modules: models and stand-in layers
    "quipjax.models": 1, "quipjax.layers": 1,
    # L2 distribution, training, generation (and the re-exports of moved modules)
    "quipjax.distributed": 2, "quipjax.training": 2, "quipjax.generate": 2, "quipjax.rules": 2,
    "quipjax.finetune": 2, "quipjax.sharding": 2,
    # L3 the job
    "quipjax.pipeline": 3, "quipjax.formats.quipsharp": 3,
    "quipjax.formats.quipsharp.folder": 3,
    # the flat public API
    "quipjax": 4,
}


def modules(root: str, package: str) -> dict:
    """{module name: file} of every .py under root/package (package inits by package name)."""
    out = {}
    base = os.path.join(root, package)
    for dp, _, fs in os.walk(base):
        for f in fs:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dp, f), root)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                    os.path.join(dp, f)
    return out


def layer_of(module: str, layers: dict):
    best = None
    for prefix in layers:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return None if best is None else layers[best]


def _imports(mod: str, path: str, mods: dict):
    """(line, target module, imported name or None, alias) of every import in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None, a.asname or a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                full = f"{target}.{a.name}"
                if full in mods:                       # `from pkg import module`
                    yield node.lineno, full, None, a.asname or a.name
                else:
                    yield node.lineno, target, a.name, a.asname or a.name


def check(root: str, package: str, layers: dict) -> list:
    """Problems (one line each): unknown modules, imports from a higher layer, import cycles,
    uses of another module's private names."""
    mods = modules(root, package)
    problems = [f"{m}: no layer assigned" for m in mods if layer_of(m, layers) is None]
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        alias = {}
        for line, target, name, asname in _imports(m, path, mods):
            t = target
            while t and t not in mods:                 # `import a.b.c` reaches module a.b.c
                t = t.rpartition(".")[0]
            if not t or t == m:
                continue
            edges[m].add(t)
            lm, lt = layer_of(m, layers), layer_of(t, layers)
            if lm is not None and lt is not None and lt > lm:
                problems.append(f"{m}:{line} (layer {lm}) imports {t} (layer {lt})")
            if name and name.startswith("_") and not name.startswith("__"):
                problems.append(f"{m}:{line} imports the private {name} from {t}")
            if name is None or f"{target}.{name}" in mods:
                alias[asname] = t if name is None else f"{target}.{name}"
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in alias and alias[node.value.id] != m
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{m}:{node.lineno} uses {alias[node.value.id]}.{node.attr}")
    # cycles (a package importing its own children is a re-export, not a cycle)
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(w):] + [w]))
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return problems


def test_quipjax_is_layered():
    problems = check(ROOT, "quipjax", LAYERS)
    assert not problems, "\n".join(problems)


def test_checker_finds_each_kind_of_violation(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from pkg import high\n    return high.g()\n",   # upward, local
        "low/b.py": "from pkg.low import c\n",
        "low/c.py": "import pkg.low.b\n",                                          # b <-> c
        "low/d.py": "from pkg.low.b import _secret\nfrom pkg.low import c as cc\nx = cc._y\n",
        "high.py": "def g():\n    return 1\n",
        "stray.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    got = check(str(tmp_path), "pkg", {"pkg.low": 0, "pkg.high": 1, "pkg": 2})
    joined = "\n".join(got)
    assert "pkg.low.a:2 (layer 0) imports pkg.high (layer 1)" in joined
    assert "import cycle: pkg.low.b -> pkg.low.c -> pkg.low.b" in joined
    assert "pkg.low.d:1 imports the private _secret from pkg.low.b" in joined
    assert "pkg.low.d:3 uses pkg.low.c._y" in joined
    assert "pkg.stray: no layer assigned" not in joined          # "pkg" covers it
    assert len(got) == 4, got
    assert check(str(tmp_path), "pkg", {"pkg.low": 0}) .count("pkg.stray: no layer assigned") == 1


@pytest.mark.parametrize("module", ["quipjax.quantize", "quipjax.pipeline.run"])
def test_layers_are_assigned_as_documented(module):
    assert layer_of(module, LAYERS) == {"quipjax.quantize": 0, "quipjax.pipeline.run": 3}[module]
