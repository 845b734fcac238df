"""The layout the architecture doc promises, checked: small classes, no import cycles, no
module reading another object's private attributes, and a module map that names every
module (docs/architecture.md)."""

from __future__ import annotations

import ast
import pathlib
from typing import Any

import distbreaker

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the package that is imported: the source tree, or the installed wheel in CI's second run
PKG = pathlib.Path(distbreaker.__file__).resolve().parent
MAX_CLASS_LINES = 250

# Private reads of another object that are the object's own business: the same class.
ALLOWED_PRIVATE = {
    ("_config.py", "other._key"),  # __eq__ of the same class
    ("_listener.py", "hub._backend_ref"),  # set and read by hub_for, beside the class
    ("breaker.py", "b._core"),  # _check_error, beside the shells it serves
    ("breaker.py", "self._breaker._engine"),  # _Protect, the shell's own helper
    ("breaker.py", "b._metrics_with_fleet"),  # MetricsView, the shell's own view
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, p: pathlib.Path, mods: dict[str, pathlib.Path]) -> set[str]:
    pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(p.read_text())):  # TYPE_CHECKING blocks included
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for c in [target] + [f"{target}.{a.name}" for a in node.names]:
                if c in mods and c != name:
                    deps.add(c)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in mods and a.name != name}
    return deps


def test_the_checks_see_the_whole_package() -> None:
    assert len(_modules()) >= 30  # they would pass vacuously on an empty folder


def test_no_class_is_longer_than_about_250_lines() -> None:
    long = []
    for name, p in _modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []


def test_no_module_imports_another_in_a_cycle() -> None:
    mods = _modules()
    # the package's __init__ re-exports everything: it is the top, never a dependency
    graph = {n: _imports(n, p, mods) - {"distbreaker"} for n, p in mods.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append([*stack[stack.index(v):], v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_checker_sees_a_type_only_cycle(tmp_path: pathlib.Path) -> None:
    """The cycle check reads TYPE_CHECKING imports too (so it can fail)."""
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
    p = tmp_path / "a.py"
    p.write_text(src)
    mods = {"pkg.a": p, "pkg.b": tmp_path / "b.py"}
    assert _imports("pkg.a", p, mods) == {"pkg.b"}


def test_no_module_reads_another_objects_private_attributes() -> None:
    found = set()
    for p in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                v = node.value
                if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                    continue
                found.add((p.name, ast.unparse(node)))
    assert found <= ALLOWED_PRIVATE, sorted(found - ALLOWED_PRIVATE)


def test_the_module_map_names_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for p in _modules().values():
        if p.name == "__init__.py":
            continue
        shown = str(p.relative_to(PKG))
        if f"`{shown}`" not in doc and f"`{p.name}`" not in doc:
            missing.append(shown)
    assert missing == []
    readme = (ROOT / "README.md").read_text()
    assert "docs/architecture.md" in readme


def test_a_dropped_breaker_is_freed_at_once_in_every_mode(redis_client: Any) -> None:
    """No reference cycle keeps a breaker alive after its last user lets go: until the GC
    ran, a dead one would stay a member of its hub and guard (and re-read Redis). With
    the GC off, only reference counting frees it; the listener thread may hold it for
    the moment of one re-read, so this waits up to 2 s."""
    import asyncio
    import gc
    import time
    import weakref

    import redis.asyncio as aredis

    from distbreaker import AsyncCircuitBreaker, CircuitBreaker, CircuitBreakerConfig

    def dropped(make: Any) -> list[str]:
        alive = []
        for mode in ("strict", "batched"):
            b = make(CircuitBreakerConfig(consistency=mode))
            refs = {"breaker": weakref.ref(b), "engine": weakref.ref(b._engine),
                    "core": weakref.ref(b._core)}
            del b
            deadline = time.monotonic() + 2.0
            while any(r() is not None for r in refs.values()) and time.monotonic() < deadline:
                time.sleep(0.01)
            alive += [f"{mode} {k}" for k, r in refs.items() if r() is not None]
        return alive

    gc.collect()
    gc.disable()
    try:
        sync = dropped(lambda cfg: CircuitBreaker("drop-sync", cfg, redis=redis_client))

        async def main() -> list[str]:
            client = aredis.Redis(port=redis_client.connection_pool.connection_kwargs["port"])

            async def make(cfg: Any) -> Any:
                b = AsyncCircuitBreaker("drop-async", cfg, redis=client)

                async def one() -> int:
                    return 1

                await b.call(one)  # the listener task and, batched, the writer task run
                await b.flush()
                return b

            out = []
            for mode in ("strict", "batched"):
                b = await make(CircuitBreakerConfig(consistency=mode))
                refs = {"breaker": weakref.ref(b), "engine": weakref.ref(b._engine)}
                del b
                deadline = time.monotonic() + 2.0
                while (any(r() is not None for r in refs.values())
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.01)  # finished tasks drop their frames
                out += [f"{mode} {k}" for k, r in refs.items() if r() is not None]
            await client.aclose()
            return out

        asyncio_ = asyncio.run(main())
    finally:
        gc.enable()
    assert sync == [] and asyncio_ == []
