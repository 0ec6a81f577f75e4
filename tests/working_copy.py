"""The working tree as a fresh clone has it, for tests that run the project's own commands in a copy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_copy(copy: Path) -> Path:
    """Tracked and new files into `copy`, mtimes kept; nothing git ignores (.venv, .deps, runs, results)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy
