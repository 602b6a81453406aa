"""The CPU worker's imports leave out GPU-only code: Triton comes in only with model.gpu_retrieval."""

from __future__ import annotations

import subprocess
import sys

CHECK = (
    "import sys, stream.worker.app\n"
    "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'model.gpu_'))))"
)


def test_worker_path_never_imports_triton() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
