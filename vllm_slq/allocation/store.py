"""The candidate store: every layer's database entries as packed codes, on one device.

The allocation mixes, per layer, the FP weight with one of up to seven candidate
quantizations (one per width). Keeping those candidates dense is what ran out of
memory: fp16 differences W^(k) - W_ref cost 14 bytes per weight for seven widths
(98 GB for Llama-3.1-8B). Here a candidate keeps what its checkpoint would: b-bit
codes, scales and zero points, so seven widths 2..8 cost sum(b) = 35 bits per weight
(about 4.4 bytes; 31 GB for an 8B model's 7B linear weights) plus their group
parameters, and a dense weight exists only transiently, one layer at a time, when
the objective's forward or backward dequantizes it (objective.MixedLinear).

Code layout: bit planes. A b-bit code is split into planes of 4, 2 and 1 bits
(3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; 2, 4 and 8 are one plane), and each plane
packs 8/w values per byte along the row. Unpacking is a few shifts and masks on
uint8 tensors: no gathers. The checkpoint's bit stream (quant.packing) lets a
3/5/6/7-bit value straddle two words, and reading it needs two gathers per value;
measured on this 2-core CPU that is 10-110 ns per weight against about 1 ns here,
and the objective dequantizes every candidate of every layer in each backward.
This layout is internal to the allocation and never written to disk.

Dequantization goes through quant.spec.dequantize_codes, the format's one dequant.

With an OffloadDir (allocation.offload; the 70B path) every candidate's tensors rest in
memory-mapped files and are copied onto the store's device only while it is dequantized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from vllm_slq.quant.spec import QuantizedWeight, QuantSpec, dequantize_codes

from .offload import OffloadDir

__all__ = ["PLANE_SPLITS", "pack_planes", "unpack_planes", "StoredCandidate", "CandidateStore"]

# plane widths per code width, most significant plane first
PLANE_SPLITS: dict[int, tuple[int, ...]] = {
    2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def pack_planes(unsigned: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """uint8 [N, K] values in [0, 2^b) -> one uint8 [N, ceil(K*w/8)] tensor per plane of width w."""
    if bits not in PLANE_SPLITS:
        raise ValueError(f"pack_planes: bits must be in {sorted(PLANE_SPLITS)}, got {bits!r}")
    if unsigned.dim() != 2 or unsigned.dtype != torch.uint8:
        raise ValueError(f"pack_planes: expected a 2-D uint8 tensor, got {unsigned.dtype} {tuple(unsigned.shape)}")
    n, k = unsigned.shape
    planes, low = [], bits
    for w in PLANE_SPLITS[bits]:
        low -= w
        vals = (unsigned >> low) & ((1 << w) - 1)
        per = 8 // w
        pad = (-k) % per
        if pad:
            vals = torch.nn.functional.pad(vals, (0, pad))
        vals = vals.reshape(n, -1, per)
        word = torch.zeros(vals.shape[:2], dtype=torch.uint8, device=unsigned.device)
        for j in range(per):  # value j of a byte sits at bits [j*w, (j+1)*w)
            word |= vals[:, :, j] << (j * w)
        planes.append(word)
    return planes


def unpack_planes(planes: list[torch.Tensor], bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_planes: the planes -> uint8 [N, K] values in [0, 2^b)."""
    out = None
    for w, word in zip(PLANE_SPLITS[bits], planes):
        shifts = torch.arange(0, 8, w, dtype=torch.uint8, device=word.device)
        vals = ((word.unsqueeze(-1) >> shifts) & ((1 << w) - 1)).reshape(word.shape[0], -1)[:, :in_features]
        out = vals if out is None else (out << w) | vals
    return out


@dataclass
class StoredCandidate:
    """One database entry of one layer, compact: planes of codes plus group parameters."""

    spec: QuantSpec
    in_features: int
    planes: list[torch.Tensor]
    scale: torch.Tensor                  # [N, groups], the stored scale dtype
    zero_point: Optional[torch.Tensor]   # int8 [N, groups] (signed), None when symmetric
    meta: dict = field(default_factory=dict)
    # set when the tensors above rest in offload files: the device they are copied onto for use
    onto: Optional[torch.device] = None

    def _resident(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return t if self.onto is None or t is None else t.to(self.onto, copy=True)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, device: torch.device | str) -> "StoredCandidate":
        offset = 1 << (qw.spec.bits - 1)
        unsigned = (qw.codes.to(device=device, dtype=torch.int16) + offset).to(torch.uint8)
        return cls(qw.spec, qw.codes.shape[1], pack_planes(unsigned, qw.spec.bits), qw.scale.to(device),
                   None if qw.zero_point is None else qw.zero_point.to(device), dict(qw.meta))

    def offload(self, where: OffloadDir) -> None:
        """Rest this entry's tensors in `where`'s files; it is copied back to its device per use."""
        self.onto = self.scale.device
        self.planes = [where.put(p) for p in self.planes]
        self.scale = where.put(self.scale)
        self.zero_point = None if self.zero_point is None else where.put(self.zero_point)

    def codes(self) -> torch.Tensor:
        """Signed int8 codes [N, K]."""
        unsigned = unpack_planes([self._resident(p) for p in self.planes], self.spec.bits, self.in_features)
        return (unsigned.to(torch.int16) - (1 << (self.spec.bits - 1))).to(torch.int8)

    def resident_scale(self) -> torch.Tensor:
        """The stored scale [N, groups] on the device the entry is used on."""
        return self._resident(self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(q - z) * s in `dtype`; `scale` [N, groups] replaces the stored scale (the scale tuning's
        trial scales, on the device the entry is used on)."""
        return dequantize_codes(self.codes(), self._resident(self.scale) if scale is None else scale,
                                self._resident(self.zero_point), self.spec.group_size, dtype)

    def to_quantized(self) -> QuantizedWeight:
        """The entry as a QuantizedWeight on the CPU (what the checkpoint writer takes)."""
        return QuantizedWeight(self.codes().cpu(), self.scale.cpu(),
                               None if self.zero_point is None else self.zero_point.cpu(), self.spec, dict(self.meta))

    @property
    def nbytes(self) -> int:
        t = [*self.planes, self.scale] + ([] if self.zero_point is None else [self.zero_point])
        return sum(x.numel() * x.element_size() for x in t)


class CandidateStore:
    """{layer: {spec: StoredCandidate}} on one device; what the allocation mixes from.

    Filled layer by layer as the database is built (put), or at once from a
    {layer: {spec: QuantizedWeight}} database (from_database). With `offload` every
    entry rests in that OffloadDir's files as soon as it is put, and only the entries
    being dequantized are on `device`.
    """

    def __init__(self, device: torch.device | str = "cpu", offload: Optional[OffloadDir] = None):
        self.device = torch.device(device)
        self.offload = offload
        self._layers: dict[str, dict[QuantSpec, StoredCandidate]] = {}

    @classmethod
    def from_database(cls, database: dict[str, dict[QuantSpec, QuantizedWeight]],
                      device: torch.device | str = "cpu", offload: Optional[OffloadDir] = None) -> "CandidateStore":
        store = cls(device, offload)
        for name, entries in database.items():
            store.put(name, entries)
        return store

    def put(self, layer: str, entries: dict[QuantSpec, QuantizedWeight]) -> None:
        shapes = {tuple(q.codes.shape) for q in entries.values()}
        if len(shapes) > 1:
            raise ValueError(f"candidate store: layer {layer!r} has entries of different shapes {sorted(shapes)}")
        stored = {s: StoredCandidate.from_quantized(q, self.device) for s, q in entries.items()}
        if self.offload is not None:
            for c in stored.values():
                c.offload(self.offload)
        self._layers[layer] = stored

    def __contains__(self, layer: str) -> bool:
        return layer in self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def layers(self) -> list[str]:
        return list(self._layers)

    def specs(self, layer: str) -> list[QuantSpec]:
        return list(self._layers[layer])

    def get(self, layer: str, spec: QuantSpec) -> StoredCandidate:
        try:
            return self._layers[layer][spec]
        except KeyError:
            raise KeyError(f"candidate store has no {spec.short()} entry for layer {layer!r}") from None

    def quantized(self, layer: str, spec: QuantSpec) -> QuantizedWeight:
        return self.get(layer, spec).to_quantized()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for entries in self._layers.values() for c in entries.values())

    def clear(self) -> None:
        self._layers.clear()

    def close(self) -> None:
        """Empty the store for good: with offload, its scratch directory goes too."""
        self.clear()
        if self.offload is not None:
            self.offload.close()
