"""`python -m kvrec.bench.sizes [ROOT]`: the size of the code (issue 29): non-test lines and files,
every file over 400 lines and every function over 60 (a file over 400 lines should say in its
opening comment why it is one thing; a function over 60 lines should be a declaration table)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FILE_LINES, FUNCTION_LINES = 400, 60
SKIPPED = {".venv", "tests", ".git"}


def report(root: Path) -> str:
    files = [p for p in sorted(root.rglob("*.py")) if not SKIPPED & set(p.relative_to(root).parts)]
    total, big_files, big_functions = 0, [], []
    for path in files:
        text = path.read_text()
        lines = len(text.splitlines())
        total += lines
        name = str(path.relative_to(root))
        if lines > FILE_LINES:
            big_files.append((lines, name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_LINES:
                    big_functions.append((length, f"{name}:{node.lineno} {node.name}"))
    out = [f"{total} non-test lines in {len(files)} files",
           f"{len(big_files)} files > {FILE_LINES} lines:"]
    out += [f"  {n:5d} {f}" for n, f in sorted(big_files, reverse=True)]
    out.append(f"{len(big_functions)} functions > {FUNCTION_LINES} lines:")
    out += [f"  {n:5d} {f}" for n, f in sorted(big_functions, reverse=True)]
    return "\n".join(out)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
