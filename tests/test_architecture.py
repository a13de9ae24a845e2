"""The layers of docs/ARCHITECTURE.md, checked on the imports themselves (an ``ast`` walk).

``models`` <- ``domain`` <- {``app`` (HTTP), ``worker`` (execution)}; the HTTP and execution
layers meet only in the composition root ``cli`` (the command line and ``cli.asgi``, the app
wired to its runner). Every import counts, at module level or inside a function, and no module
may reach itself through its imports. A rule for a sub-package (``domain.trust``,
``bench.http``) replaces its package's rule there.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "domain", "app", "worker", "bench", "migrations", "cli")
COMPOSITION_ROOTS = ("cli",)

# What each layer may import from this project, and third-party packages it must not use.
ALLOWED = {
    "models": {"models"},
    "domain": {"models", "domain", "migrations"},  # domain.store.migrate runs the schema history
    "app": {"models", "domain", "app"},
    "worker": {"models", "domain", "worker"},
    "bench": {"models", "domain", "worker", "bench"},
    "migrations": {"domain", "migrations"},
    # The offline verifier's package: canonical JSON, signing, verification; no storage.
    "domain.trust": {"models", "domain.trust", "domain.intake", "domain.errors", "domain.config"},
    # Benchmarks of the HTTP service start it as `serve` does (cli.asgi).
    "bench.http": {"models", "domain", "worker", "bench", "cli"},
}
WEB = {"fastapi", "starlette", "uvicorn"}
QUEUE = {"celery", "kombu"}
FORBIDDEN_THIRD_PARTY = {
    "models": WEB | QUEUE | {"sqlalchemy", "alembic", "psycopg", "redis", "pydantic_settings"},
    "domain": WEB | QUEUE,
    "app": QUEUE,
    "worker": WEB,
    "bench": WEB | QUEUE,
    "migrations": WEB | QUEUE,
    "domain.trust": WEB | QUEUE | {"sqlalchemy", "alembic", "psycopg", "redis"},
    "bench.http": QUEUE,  # the floor it compares with is a FastAPI app
}


def layer_of(module: str) -> str:
    """The most specific key of ``ALLOWED`` that ``module`` belongs to."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in ALLOWED:
            return ".".join(parts[:i])
    return parts[0]


def allowed(layer: str, name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in ALLOWED[layer])


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(root: Path) -> Iterator[Path]:
    for package in PACKAGES:
        if (root / package).is_dir():
            yield from sorted((root / package).rglob("*.py"))


def resolve(name: str, root: Path) -> str:
    """``a.b.c`` if it is a module or package of the tree, else its longest existing prefix."""
    parts = name.split(".")
    while parts:
        base = root.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return name


def imports(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, imported name) for every import in the file, relative ones made absolute."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base


def violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks the layer rules, as 'file:line: module imports name'."""
    found = []
    for path in python_files(root):
        here = module_name(path, root)
        layer = layer_of(here)
        if any(here == r or here.startswith(r + ".") for r in COMPOSITION_ROOTS):
            continue
        for line, name in imports(path, root):
            top = name.split(".")[0]
            if top in PACKAGES and not allowed(layer, name):
                found.append(f"{path.relative_to(root)}:{line}: {here} imports {name}")
            elif top in FORBIDDEN_THIRD_PARTY[layer]:
                found.append(f"{path.relative_to(root)}:{line}: {here} uses {top}")
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in python_files(root):
        here = module_name(path, root)
        edges = graph.setdefault(here, set())
        for _, name in imports(path, root):
            if name.split(".")[0] in PACKAGES:
                target = resolve(name, root)
                if target != here:
                    edges.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_follows_the_layers() -> None:
    assert violations() == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checks_catch_a_forbidden_import_and_a_cycle(tmp_path: Path) -> None:
    """Teeth: the HTTP app importing the worker (routes and ``app.main`` alike), a model importing
    FastAPI inside a function, the offline verifier's package reaching storage, and a two-module
    cycle are all reported; the composition root ``cli`` may import every layer."""
    root = _tree(
        tmp_path,
        {
            "cli/__init__.py": "import worker.jobs\nimport bench.run\nfrom app import main\n",
            "app/__init__.py": "",
            "app/main.py": "from worker.runner import InProcessRunner\n",
            "app/routes/__init__.py": "",
            "app/routes/jobs.py": "from worker import jobs\n",
            "domain/__init__.py": "",
            "domain/trust/__init__.py": "",
            "domain/trust/verification.py": "from domain.store import tables\nimport sqlalchemy\n",
            "domain/trust/signing.py": "from domain.errors import ServiceError\n",
            "worker/__init__.py": "",
            "worker/jobs.py": "from . import sweep\n",
            "worker/sweep.py": "def f():\n    from worker.jobs import x\n",
            "models/__init__.py": "",
            "models/core.py": "def g():\n    import fastapi\n",
        },
    )
    found = violations(root)
    assert any("app.routes.jobs imports worker.jobs" in v for v in found), found
    assert any("app.main imports worker.runner" in v for v in found), found
    assert any("models.core uses fastapi" in v for v in found), found
    assert any("domain.trust.verification imports domain.store.tables" in v for v in found), found
    assert any("domain.trust.verification uses sqlalchemy" in v for v in found), found
    assert not any(v.startswith(("cli/", "domain/trust/signing.py")) for v in found), found
    assert cycles(import_graph(root)) == [["worker.jobs", "worker.sweep"]]


def test_domain_is_split_by_concern() -> None:
    """At most a dozen modules directly under ``domain/``; the rest live in its sub-packages
    (``store``, ``trust``, ``intake``, ``services``)."""
    top = sorted(p.name for p in (ROOT / "domain").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 12, top
    for package in ("store", "trust", "intake", "services"):
        assert (ROOT / "domain" / package / "__init__.py").is_file(), package


PRODUCT = ("app", "cli", "domain", "worker", "models", "bench")
LONGEST = 80  # lines: split a longer function into named steps


def long_functions(root: Path = ROOT, limit: int = LONGEST) -> list[str]:
    """Every product function (not migrations: they stay as written) longer than ``limit``."""
    found = []
    for package in PRODUCT:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} {length}")
    return found


def test_no_product_function_is_over_80_lines() -> None:
    assert long_functions() == []


def test_the_length_check_catches_a_long_function(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(LONGEST))
    root = _tree(tmp_path, {"worker/jobs.py": f"def run_job():\n{body}\n\ndef ok():\n    pass\n"})
    assert long_functions(root) == [f"worker/jobs.py:1 run_job {LONGEST + 1}"]
