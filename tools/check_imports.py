"""Import boundaries (run by `make lint`): exits 1 listing every import that crosses one.

- services/<a> never imports another service's package (csx_<b>), nor csx_cli: services talk
  through the protos (gRPC and events), never through each other's Python.
- libs/common is mechanism, never domain: it imports no csx_<service>, no csx_cli, no
  csx_safeguarding and no service's contract (csx.<service>.v1).
- libs/safeguarding is the safeguarding kernel the services share: it imports no csx_<service>, no
  csx_cli and no service's contract (it reads csx.safeguarding.v1, which referrals publishes).
- libs/cli drives the services over gRPC only: it imports no csx_<service>.
- libs/client is what agency systems install: it imports no csx_common, csx_cli or csx_<service>.

Every `import` and `from ... import` statement is checked, wherever it sits in the module (inside
functions and `if TYPE_CHECKING:` blocks too).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def service_packages(root: Path) -> dict[str, str]:
    """{"referrals": "csx_referrals", ...} from services/*/."""
    return {d.name: f"csx_{d.name}" for d in sorted((root / "services").iterdir()) if d.is_dir()}


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def rules(root: Path) -> list[tuple[Path, set[str], str]]:
    """(source directory, forbidden top-level packages, why)."""
    services = service_packages(root)
    out: list[tuple[Path, set[str], str]] = []
    for name in services:
        forbidden = {p for n, p in services.items() if n != name} | {"csx_cli"}
        out.append((root / "services" / name, forbidden, "services never import another service or the CLI"))
    contracts = {f"csx.{name}" for name in services}
    out.append(
        (
            root / "libs" / "common",
            set(services.values()) | contracts | {"csx_cli", "csx_safeguarding"},
            "libs/common is mechanism, never domain",
        )
    )
    out.append(
        (
            root / "libs" / "safeguarding",
            set(services.values()) | contracts | {"csx_cli"},
            "the safeguarding kernel reads no service's code or contract",
        )
    )
    out.append((root / "libs" / "cli", set(services.values()), "the CLI talks to services over gRPC only"))
    out.append(
        (
            root / "libs" / "client",
            set(services.values()) | {"csx_cli", "csx_common"},
            "the agency client library needs none of the server code",
        )
    )
    return out


def check(root: Path = ROOT) -> list[str]:
    problems: list[str] = []
    for directory, forbidden, why in rules(root):
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*.py")):
            if any(part in {".venv", "__pycache__", "build"} for part in path.parts):
                continue
            try:
                modules = list(imported_modules(path))
            except SyntaxError as exc:
                problems.append(f"{path.relative_to(root)}:{exc.lineno}: cannot parse ({exc.msg})")
                continue
            for lineno, module in modules:
                if any(within(module, package) for package in forbidden):
                    problems.append(f"{path.relative_to(root)}:{lineno}: imports {module} ({why})")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]).resolve() if len(argv) > 1 else ROOT
    problems = check(root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} import boundary violation(s)", file=sys.stderr)
        return 1
    print("import boundaries: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
