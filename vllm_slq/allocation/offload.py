"""Tensors at rest in memory-mapped files, copied onto the compute device only while in use.

Why: the allocation of a 70B model cannot hold the model (141 GB in bf16) and its
candidate store (35 bits per linear weight, about 300 GB) on one 80 GB GPU. It does not
need to. ModelKLObjective runs decoder blocks checkpointed, so its forward and its
backward each touch one block at a time, and MixedLinear dequantizes one layer's
candidates at a time. With an offload directory:

  * each decoder block's parameters and buffers are written to files and replaced by
    read-only memory maps of them (``offload_module``); ``onloaded(block, device)``
    copies them onto the device for the block's forward (and again for its recompute in
    the backward) and lets the copies go afterwards;
  * the CandidateStore writes every candidate's packed codes and group parameters the
    same way as the database is built, and a candidate is copied onto the device only
    while it is dequantized.

The device then holds the non-block parameters (embeddings, final norm, output head),
one block's weights and candidates, the checkpointed block inputs and one block's
activations. Host RAM holds what the page cache keeps of the files, and the OS pages
them from disk when it cannot keep them all.

The files are unlinked as soon as they are mapped: the mapping keeps the data, the
disk space is returned when the last map goes, and no run (a crashed one included)
leaves files behind. This is internal scratch, not a format: raw bytes in the
tensor's own dtype and shape. On a CPU-only machine the compute device is the CPU
itself; the copies are then anonymous memory and the maps are file pages (RssFile),
which is how benchmarks/slq_memory.py --offload measures what a GPU would hold.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


class OffloadDir:
    """Where offloaded tensors rest: put(t) writes t's bytes and returns a read-only memory map of them."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix="vllm-slq-offload-", dir=root))
        except OSError as e:
            raise OSError(f"offload directory {root}: cannot create scratch space there: {e}") from e
        self._count = 0

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor equal to t whose storage is a private memory map of a file (t's dtype and shape)."""
        t = t.detach().contiguous()
        path = self.path / f"{self._count:08d}.bin"
        self._count += 1
        if t.numel() == 0:
            return t.cpu().clone()
        t.cpu().reshape(-1).view(torch.uint8).numpy().tofile(path)
        try:
            mapped = torch.from_file(str(path), shared=False, size=t.numel(), dtype=t.dtype).view(t.shape)
        finally:
            path.unlink()  # the map keeps the data; the space goes back when the map does
        return mapped

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of `module`, recursively: what offload_module moves."""
    yield from module.parameters()
    yield from module.buffers()


def offload_module(module: torch.nn.Module, where: OffloadDir) -> None:
    """Every parameter and buffer of `module` (recursively) now rests in a file of `where`."""
    for t in module_tensors(module):
        t.data = where.put(t.data)


def restore_module(module: torch.nn.Module, device: torch.device | str) -> None:
    """Undo offload_module: every parameter and buffer back in memory on `device`."""
    for t in module_tensors(module):
        t.data = t.data.to(device, copy=True)


@contextmanager
def onloaded(module: torch.nn.Module, device: torch.device | str):
    """Inside, `module`'s parameters and buffers (recursively) are copies on `device`.

    The copies are put in the modules' parameter and buffer slots in place of the
    resting tensors, not poured into them (``.data``): whatever autograd saves (a
    MixedLinear's weight, a norm's scale) keeps the copy it computed with until its
    backward has run, however the slots change afterwards. Under block checkpointing
    nothing of a block is saved past its forward, so one block's copies are alive at a
    time; the recompute in the backward onloads the block again."""
    copies: dict[int, torch.Tensor] = {}
    swapped = []
    try:
        for mod in module.modules():
            for slots in (mod._parameters, mod._buffers):
                for name, home in slots.items():
                    if home is None:
                        continue
                    if id(home) not in copies:
                        copies[id(home)] = home.detach().to(device, copy=True)
                    swapped.append((slots, name, home))
                    slots[name] = copies[id(home)]
        yield
    finally:
        for slots, name, home in reversed(swapped):
            slots[name] = home
