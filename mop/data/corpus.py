"""A small real-text corpus that needs no download: the Python standard library's own docs.

About 1.5 MB of English technical prose (module, class and function docstrings of ~180 stdlib
modules plus the interpreter's language-reference help topics; see `_stdlib_docs.py`), identical
across runs of the same Python build. It is collected in a fresh, isolated child interpreter so
that nothing the caller imported or patched can change it.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from . import _stdlib_docs
from .loader import TokenDataset
from .prepare import write_dataset

CORPUS_NAME = "stdlib-docs"
CORPUS_VERSION = 1


def stdlib_documents() -> list[str]:
    """The corpus as a list of documents (deterministic for a given Python build and platform)."""
    # -I: ignore PYTHON* variables and user site; -S: no site-packages .pth hooks.
    result = subprocess.run(
        [sys.executable, "-I", "-S", _stdlib_docs.__file__], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"collecting the stdlib-docs corpus failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def _corpus_source() -> dict:
    return {
        "name": CORPUS_NAME,
        "corpus_version": CORPUS_VERSION,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": sys.platform,
    }


def ensure_default_dataset(cache_dir: str | Path) -> Path:
    """Prepare the stdlib-docs corpus with the byte tokenizer under `cache_dir` once; return its dir.

    A valid dataset from the same corpus version and Python build is reused. In a multi-rank job,
    call it on one rank per node and barrier before the others read it; concurrent callers are
    safe too (the first finished copy wins, the rest are discarded).
    """
    out_dir = Path(cache_dir) / f"{CORPUS_NAME}-byte"
    if out_dir.exists():
        try:
            if TokenDataset(out_dir).meta.get("source") == _corpus_source():
                return out_dir
        except (ValueError, FileNotFoundError):
            pass  # corrupt: removed below
        shutil.rmtree(out_dir, ignore_errors=True)  # stale (other corpus or Python build) or corrupt
    write_dataset(stdlib_documents(), out_dir, "byte", source=_corpus_source(), replace=False)
    return out_dir
