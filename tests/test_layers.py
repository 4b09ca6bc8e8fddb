"""The layers of zmdevice/ARCHITECTURE.md hold: no module imports one above it, and every
module of the package sits in a layer."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "zmdevice"
LAYER_NAMES = ("ground", "middle", "stages", "top")
ENTRY_POINTS = {"__init__", "__main__"}


def documented_layers() -> dict[str, int]:
    """Module (or package) name -> layer number, from the ARCHITECTURE.md layer block."""
    text = (PACKAGE / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text[text.index("    ground:") : text.index("\n\n", text.index("    top:"))]
    levels, current = {}, None
    for line in block.splitlines():
        head, sep, rest = line.strip().partition(":")
        if sep and head in LAYER_NAMES:
            current, line = LAYER_NAMES.index(head), rest
        for name in re.findall(r"[a-z_]+", re.sub(r"\(\+|\)", " ", line)):
            levels[name] = current
    return levels


def imported_modules(path: Path) -> set[str]:
    """The zmdevice modules (first component under the package) a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zmdevice"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("zmdevice.")}
    return found - {"__version__"}


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower():
    levels = documented_layers()
    packages = {"teachers", "students", "training", "labeling", "exporting"}
    assert {"errors", "cli", *packages} <= set(levels)
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        owner = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if owner in ENTRY_POINTS:
            continue
        assert owner in levels, f"{owner} is in no layer of ARCHITECTURE.md"
        for name in imported_modules(path):
            assert name in levels, f"{path.name} imports {name}, which is in no layer"
            if levels[name] > levels[owner]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not upward, upward
