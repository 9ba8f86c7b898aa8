"""The import graph of m3lite/, converters/ and m3bench/, every import statement included (function-level ones
too): no cycle, the runtime never imports converters/ (which needs torch), and only the `m3lite bench` command
reaches into m3bench/ (which depends on both)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("m3lite", "converters", "m3bench"):
        for p in (REPO / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    graph[m].add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names)
    return {m: {t for t in ts if t in mods and t != m} for m, ts in graph.items()}


def test_runtime_never_imports_converters():
    g = import_graph()
    bad = sorted((m, t) for m, ts in g.items() if m.startswith("m3lite") for t in ts if t.startswith("converters"))
    assert not bad, bad


def test_only_the_bench_command_imports_m3bench():
    g = import_graph()
    users = sorted({m for m, ts in g.items() if not m.startswith("m3bench") for t in ts if t.startswith("m3bench")})
    assert users == ["m3lite.cli"], users


def test_no_import_cycles():
    g = import_graph()
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, cycles
    assert "m3lite.cli" in g and "m3lite.bank.reader" in g["m3lite.memory"] | g["m3lite.bank"]  # the walk sees


def test_answering_does_not_import_onnx(tiny_model_dir):
    """onnx (and ml_dtypes under it) take ~1 s to import: `chat` and `ask` must reach their prompt without it.
    Checking the shipped adapter (what `m3lite pull` does on every start), loading a model and generating run in
    a fresh interpreter that must not have imported onnx."""
    import subprocess
    import sys

    model = tiny_model_dir()
    code = ("import sys\n"
            "from m3lite import cli, chat_cli, adapter\n"
            "from m3lite.pull import adapter_path\n"
            "adapter.read_meta(adapter_path('smollm2-135m-memory'))\n"
            "from m3lite.model import Model\n"
            f"Model.load({str(model)!r}).generate('hello', max_new_tokens=2)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'ml_dtypes', 'torch')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
