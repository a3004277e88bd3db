"""The check proves the merge with code of its own: its modules import the formats' specs, the kernels and the one
reader, never the merge's modules, and the merge never imports the check's. Read from the source (every import,
those inside functions too), followed transitively through the package."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_merge

ROOT = Path(lora_merge.__file__).parent
PACKAGE = ROOT.name


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}
FORMATS = sorted(p.name for p in (ROOT / "numbers").iterdir() if p.is_dir() and not p.name.startswith("_"))

# the merge: the formats' merge modules, the makers of blocks and torch's merge arithmetic
MERGE = {m for m in MODULES if m.endswith(".merge") and m.startswith(f"{PACKAGE}.numbers.")} | {
    f"{PACKAGE}.blocks", f"{PACKAGE}.mathops", f"{PACKAGE}.kindmath", f"{PACKAGE}.orthomath", f"{PACKAGE}.fouriermath",
    f"{PACKAGE}.roadmath"}
# the check: check/ and the formats' check modules
CHECK = {m for m in MODULES if m.startswith(f"{PACKAGE}.check.") or m.endswith(".check")}


def imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES}


def reached(module: str) -> dict[str, str]:
    """Every module ``module`` reaches through imports, each with the module that imports it (to name the path)."""
    seen, todo = {module: ""}, [module]
    while todo:
        m = todo.pop()
        for i in imports(m):
            if i not in seen:
                seen[i] = m
                todo.append(i)
    return seen


def path_to(seen: dict[str, str], module: str) -> str:
    chain = [module]
    while seen[chain[-1]]:
        chain.append(seen[chain[-1]])
    return " <- ".join(chain)


def test_the_sides_are_where_the_contract_says():
    assert FORMATS == ["bnb", "floats", "fp8", "mxfp4", "nvfp4"]
    assert {f"{PACKAGE}.numbers.{f}.merge" for f in ("floats", "fp8", "mxfp4")} <= MERGE
    assert {f"{PACKAGE}.numbers.{f}.check" for f in ("floats", "fp8", "mxfp4")} <= CHECK
    assert {f"{PACKAGE}.check.readback", f"{PACKAGE}.check.elements", f"{PACKAGE}.check.grid"} <= CHECK


def test_the_check_never_imports_the_merge():
    for module in sorted(CHECK):
        seen = reached(module)
        wrong = sorted(m for m in seen if m in MERGE)
        assert not wrong, f"{module} reaches the merge: {[path_to(seen, m) for m in wrong]}"


def test_the_merge_never_imports_the_check():
    for module in sorted(MERGE):
        seen = reached(module)
        wrong = sorted(m for m in seen if m in CHECK)
        assert not wrong, f"{module} reaches the check: {[path_to(seen, m) for m in wrong]}"


def test_each_side_of_a_format_reads_its_definition_from_the_spec():
    for fmt in FORMATS:
        folder = f"{PACKAGE}.numbers.{fmt}"
        for side in ("merge", "check"):
            if f"{folder}.{side}" in MODULES:
                assert f"{folder}.spec" in imports(f"{folder}.{side}"), f"{folder}.{side} does not import its spec"


def test_stored_bytes_are_read_only_through_the_reader():
    """``os.open`` of a tensor file appears only in the reader and the modules that open files under paths.py's
    rules (and the output's own files)."""
    allowed = {f"{PACKAGE}.{m}" for m in ("paths", "reader", "output", "cli")}
    for module, path in MODULES.items():
        if module not in allowed:
            assert "os.open(" not in path.read_text(), f"{module} opens a file itself; read through reader.py"


def test_the_contract_can_fail():
    """The walk finds a path where there is one: the writer reaches both sides."""
    seen = reached(f"{PACKAGE}.writer")
    assert f"{PACKAGE}.blocks" in seen and f"{PACKAGE}.check.readback" in seen
    assert path_to(seen, f"{PACKAGE}.blocks").endswith(f"{PACKAGE}.writer")
