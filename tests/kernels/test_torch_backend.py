"""The memory-efficient "torch" backend against the dense reference.

Tolerances are relative to the output scale ``max|ref|`` (ref computed in float32 from the same, already
rounded, inputs):
* float32 3e-5: both sides accumulate in fp32; the only differences are summation order and the online
  (blockwise) softmax rescaling, observed ~1e-6 relative.
* float16 1e-2: rounding the output to fp16 alone costs up to 2^-11 ~ 4.9e-4; SDPA's fused kernels also round
  the softmax probabilities to the input dtype before the P @ V product (another ~5e-4 per term, averaging
  down); observed <= 2e-3. 1e-2 is the fixtures' documented fp16 tolerance.
* bfloat16 6e-2: the same two roundings at 2^-8 ~ 3.9e-3 each, observed <= 1.6e-2; 6e-2 is the fixtures'
  documented bf16 tolerance (measured 4.1e-2 there on |out| ~ 9).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layout_expect import in_q_order
from torch.utils._python_dispatch import TorchDispatchMode

from naclip_kernels import check_inputs, gaussian_attention, reference_attention
from naclip_kernels.torch_backend import DEFAULT_BUDGET_BYTES, plan_chunks, torch_attention

TOL = {torch.float32: 3e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _id(x):
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    return str(x)


def assert_matches_reference(out, q, k, v, grid, sigma, **kw):
    ref = reference_attention(q.float(), k.float(), v.float(), grid, sigma, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype and in_q_order(out, q)
    scale = ref.abs().max().clamp_min(1e-6)
    err = ((out.float() - ref).abs().max() / scale).item()
    assert err <= TOL[q.dtype], f"relative error {err:.3g} > {TOL[q.dtype]} ({q.dtype})"


def run(q, k, v, grid, sigma, *, budget=None, min_rows=1, **kw):
    spec = check_inputs(q, k, v, grid, sigma, **kw)
    return torch_attention(q, k, v, spec, budget_bytes=budget, min_rows=min_rows)


def _qkv(B, H, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))


# small budgets force several query chunks (and batch chunks) on small problems
SMALL_BUDGET = 6000


@pytest.mark.parametrize("D", [16, 32, 48, 64, 80, 96, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_dtypes_and_head_dims(dtype, D):
    q, k, v = _qkv(2, 2, 1 + 5 * 7, D, dtype, seed=D)
    out = run(k, k, v, (5, 7), 5.0, budget=SMALL_BUDGET)
    assert_matches_reference(out, k, k, v, (5, 7), 5.0)
    out = run(q, k, v, (5, 7), 1.5, budget=None)
    assert_matches_reference(out, q, k, v, (5, 7), 1.5)


@pytest.mark.parametrize("sigma", [0.5, 5.0, 50.0, None], ids=lambda s: f"sigma{s}")
@pytest.mark.parametrize("P", [0, 1, 2, 8], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("grid", [(1, 1), (1, 9), (9, 1), (4, 6), (6, 4), (7, 7), (3, 11)], ids=_id)
def test_grids_prefixes_sigmas(grid, P, sigma):
    N = P + grid[0] * grid[1]
    q, k, v = _qkv(1, 3, N, 16, seed=N)
    for budget in (SMALL_BUDGET, 1, None):
        out = run(k, k, v, grid, sigma, num_prefix_tokens=P, budget=budget)
        assert_matches_reference(out, k, k, v, grid, sigma, num_prefix_tokens=P)


def _layout(name: str, B: int, H: int, N: int, D: int, dtype):
    """q, k, v of shape [B, H, N, D] with the named memory layout."""
    g = torch.Generator().manual_seed(7)
    if name == "contiguous":
        return tuple(torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    if name == "bnhd_view":  # views of a batch-first [B, N, H, D] tensor (what a ViT produces)
        return tuple(torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    if name == "packed_qkv":  # F.linear(x).chunk(3, -1) views: row stride 3*H*D
        x = torch.randn(B, N, 3 * H * D, generator=g).to(dtype)
        return tuple(z.view(B, N, H, D).transpose(1, 2) for z in x.chunk(3, -1))
    if name == "transposed":  # head dim not unit-stride: stored [B, H, D, N]
        return tuple(torch.randn(B, H, D, N, generator=g).to(dtype).transpose(-1, -2) for _ in range(3))
    if name == "expanded_batch":  # stride 0 along the batch
        return tuple(torch.randn(1, H, N, D, generator=g).to(dtype).expand(B, H, N, D) for _ in range(3))
    if name == "strided_tokens":  # every other token of a longer sequence, head dim sliced
        return tuple(torch.randn(B, H, 2 * N, D + 3, generator=g).to(dtype)[:, :, ::2, :D] for _ in range(3))
    raise AssertionError(name)


LAYOUTS = ["contiguous", "bnhd_view", "packed_qkv", "transposed", "expanded_batch", "strided_tokens"]


@pytest.mark.parametrize("q_is_k", [True, False], ids=["q_is_k", "q_not_k"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_id)
def test_strided_inputs(layout, q_is_k, dtype):
    grid, P = (4, 5), 1
    q, k, v = _layout(layout, 3, 2, P + 20, 32, dtype)
    if q_is_k:
        q = k
    before = [t.clone() for t in (q, k, v)]
    out = run(q, k, v, grid, 2.0, budget=SMALL_BUDGET)
    assert_matches_reference(out, q, k, v, grid, 2.0)
    for t, b in zip((q, k, v), before, strict=True):  # inputs are never written
        assert torch.equal(t, b)


def test_no_full_copy_of_unit_stride_views(monkeypatch):
    """Views with a unit-stride head dim reach SDPA as views of the caller's storage (no .contiguous())."""
    q, k, v = _layout("packed_qkv", 2, 2, 1 + 12, 16, torch.float32)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(qq, kk, vv, **kw):
        seen.append((qq.untyped_storage().data_ptr(), kk.untyped_storage().data_ptr()))
        return real(qq, kk, vv, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    run(k, k, v, (3, 4), 1.0, budget=1)
    assert len(seen) > 1
    assert all(p == (k.untyped_storage().data_ptr(),) * 2 for p in seen)


@pytest.mark.parametrize("budget", [1, 3000, 20000, 10**9], ids=lambda b: f"budget{b}")
@pytest.mark.parametrize("B", [1, 5], ids=lambda b: f"B{b}")
def test_chunking_and_batch_splitting(budget, B):
    q, k, v = _qkv(B, 2, 3 + 6 * 5, 16, seed=B)
    spec = check_inputs(k, k, v, (6, 5), 3.0, num_prefix_tokens=3)
    plan = plan_chunks(spec, budget, min_rows=1)
    assert 1 <= plan.q_chunk <= spec.N and 1 <= plan.batch_chunk <= B
    out = torch_attention(k, k, v, spec, budget_bytes=budget, min_rows=1)
    assert_matches_reference(out, k, k, v, (6, 5), 3.0, num_prefix_tokens=3)


def test_cached_bias_workspace_is_invalidated():
    """Consecutive calls that share the thread's bias buffer must never see a stale bias."""
    from naclip_kernels.torch_backend import clear_workspace

    clear_workspace()
    q, k, v = _qkv(1, 2, 1 + 4 * 6, 16)
    k0 = k[:, :, :24]
    calls = [
        (k, (4, 6), 5.0, dict()),
        (k, (4, 6), 1.0, dict()),  # sigma changes
        (k, (6, 4), 1.0, dict()),  # transposed grid, same N
        (k, (4, 6), 1.0, dict(bias_scale=-2.0)),
        (k0, (4, 6), 1.0, dict(num_prefix_tokens=0)),  # prefix changes
        (k, (4, 6), 5.0, dict()),  # back to the first call
    ]
    for budget in (None, SMALL_BUDGET):
        for kk, grid, sigma, kw in calls:
            vv = v[:, :, : kk.shape[2]]
            out = run(kk, kk, vv, grid, sigma, budget=budget, **kw)
            assert_matches_reference(out, kk, kk, vv, grid, sigma, **kw)
    clear_workspace()
    out = run(k, k, v, (4, 6), 5.0)
    assert_matches_reference(out, k, k, v, (4, 6), 5.0)


def test_env_budget_is_read(monkeypatch):
    k = torch.randn(1, 1, 1 + 10 * 10, 8)
    spec = check_inputs(k, k, k, (10, 10), 2.0)
    monkeypatch.setenv("NACLIP_TORCH_CHUNK_BYTES", "4000")
    assert plan_chunks(spec, min_rows=1).q_chunk < spec.N
    monkeypatch.delenv("NACLIP_TORCH_CHUNK_BYTES")
    assert plan_chunks(spec, min_rows=1).q_chunk == spec.N


@pytest.mark.parametrize("value", ["32MB", "1e6", "4000.5"])
def test_bad_env_budget_names_the_variable(monkeypatch, value):
    k = torch.randn(1, 1, 1 + 3 * 3, 8)
    spec = check_inputs(k, k, k, (3, 3), 2.0)
    monkeypatch.setenv("NACLIP_TORCH_CHUNK_BYTES", value)
    with pytest.raises(ValueError, match=rf"NACLIP_TORCH_CHUNK_BYTES must be an integer .*got '{value}'"):
        plan_chunks(spec)
    with pytest.raises(ValueError, match="NACLIP_TORCH_CHUNK_BYTES"):
        torch_attention(k, k, k, spec)


def test_nan_propagates():
    q, k, v = _qkv(2, 2, 1 + 4 * 4, 16)
    kn = k.clone()
    kn[0, 1, 5, 3] = float("nan")  # a key touches every query row of (batch 0, head 1)
    out = run(kn, kn, v, (4, 4), 2.0, budget=SMALL_BUDGET)
    assert out[0, 1].isnan().all()
    assert not out[0, 0].isnan().any() and not out[1].isnan().any()
    qn = q.clone()
    qn[1, 0, 7, 0] = float("nan")  # a query only affects its own row
    out = run(qn, k, v, (4, 4), 2.0, budget=SMALL_BUDGET)
    assert out[1, 0, 7].isnan().all()
    assert out.isnan().sum() == 16
    vn = v.clone()
    vn[0, 0, 2, 4] = float("nan")  # a value contaminates column 4 of every row of that head
    out = run(q, k, vn, (4, 4), 2.0, budget=SMALL_BUDGET)
    assert out[0, 0, :, 4].isnan().all() and out.isnan().sum() == out.shape[2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_large_key_norms_stay_finite(dtype):
    """fp16 keys with norms ~1e3: logits ~1.25e5 before the max subtraction (beyond fp16's 65504)."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 1 + 6 * 6, 64, generator=g)
    k = (k / k.norm(dim=-1, keepdim=True) * 1e3 * torch.rand(1, 2, 37, 1, generator=g).add(0.5)).to(dtype)
    v = torch.randn(1, 2, 37, 64, generator=g).to(dtype)
    out = run(k, k, v, (6, 6), 5.0, budget=SMALL_BUDGET)
    assert out.isfinite().all()
    assert_matches_reference(out, k, k, v, (6, 6), 5.0)


def test_scale_zero_and_bias_scale():
    q, k, v = _qkv(1, 2, 1 + 3 * 4, 16)
    # scale=0 without bias: uniform attention = mean of v
    out = run(q, k, v, None, None, scale=0.0)
    torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand_as(out).contiguous(), atol=1e-6, rtol=0)
    # NACLIP's nonly: softmax(s * G) V
    for bs in (8.0, -2.5, 0.0):
        out = run(q, k, v, (3, 4), 1.5, scale=0.0, bias_scale=bs, budget=SMALL_BUDGET)
        assert_matches_reference(out, q, k, v, (3, 4), 1.5, scale=0.0, bias_scale=bs)
    out = run(q, k, v, (3, 4), 1.5, scale=0.3, bias_scale=4.0, budget=SMALL_BUDGET)
    assert_matches_reference(out, q, k, v, (3, 4), 1.5, scale=0.3, bias_scale=4.0)


@pytest.mark.parametrize(
    "N,grid,P,sigma",
    [(1, None, 1, None), (1, (1, 1), 0, 5.0), (1, (1, 1), 0, None), (2, (1, 1), 1, 0.5)],
    ids=str,
)
def test_tiny_n(N, grid, P, sigma):
    q, k, v = _qkv(2, 3, N, 8)
    out = run(q, k, v, grid, sigma, num_prefix_tokens=P)
    assert_matches_reference(out, q, k, v, grid, sigma, num_prefix_tokens=P)


def test_bias_changes_the_result():
    # guards against a backend that silently drops the bias
    q, k, v = _qkv(1, 2, 1 + 5 * 5, 16)
    a = run(k, k, v, (5, 5), 1.0, budget=SMALL_BUDGET)
    b = run(k, k, v, None, None)
    assert (a - b).abs().max() > 1e-2


def test_odd_large_n_matches_reference():
    q, k, v = _qkv(1, 2, 1 + 23 * 31, 64, seed=11)  # N = 714, several 256-row chunks under a 2 MB budget
    out = run(k, k, v, (23, 31), 5.0, budget=2 * 2**20, min_rows=256)
    assert_matches_reference(out, k, k, v, (23, 31), 5.0)


def test_official_fixture_cases_via_torch_backend(manifest, fixture_tensors):
    from test_reference import _kernel_cases, case_call, merge_heads, qkv_from_case

    for case in _kernel_cases(manifest):
        q, k, v = qkv_from_case(case, fixture_tensors)
        qq, kk, vv, grid, sigma, kw = case_call(case, q, k, v)
        out = merge_heads(gaussian_attention(qq, kk, vv, grid, sigma, backend="torch", **kw))
        exp = fixture_tensors[case["file"]][case["outputs"]["out_pre_proj"]]
        torch.testing.assert_close(out, exp, atol=1e-4, rtol=1e-4, msg=case["id"])


# ---- memory: O(N * chunk), never N x N ----


@pytest.mark.parametrize("N_grid", [(4097, 64, 64), (16385, 128, 128), (1 + 90 * 160, 90, 160)], ids=_id)
def test_planner_never_requests_n_by_n(N_grid):
    N, gh, gw = N_grid
    k = torch.empty(1, 12, N, 64, device="meta")
    spec = check_inputs(k, k, k, (gh, gw), 5.0)
    plan = plan_chunks(spec)
    assert plan.q_chunk < N
    assert plan.mask_bytes == 4 * N * plan.q_chunk
    # default budget, or the SDPA-efficiency floor of 768 rows when the budget is smaller than that
    assert plan.peak_extra_bytes <= max(DEFAULT_BUDGET_BYTES, 768 * (4 * N + 12 * 64 * 4))
    assert plan.peak_extra_bytes <= 64 * 2**20
    small = plan_chunks(spec, 2**20, min_rows=1)
    assert small.mask_bytes <= 2**20 // 1 and small.q_chunk <= 2**20 // (4 * N)


class _LargestAlloc(TorchDispatchMode):
    """Records the largest tensor produced by any aten op (what torch allocates outside fused kernels)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_largest_intermediate_is_o_n_times_chunk():
    N = 1 + 40 * 40
    k = torch.randn(1, 1, N, 16)
    v = torch.randn(1, 1, N, 16)
    spec = check_inputs(k, k, v, (40, 40), 5.0)
    budget = 1024 * 1024
    plan = plan_chunks(spec, budget, min_rows=1)
    with _LargestAlloc() as mode:
        out = torch_attention(k, k, v, spec, budget_bytes=budget, min_rows=1)
    assert plan.q_chunk < N // 8
    # the reused bias buffer (C rows, padded to 16) is the largest tensor; N*N would be 2.56M elements
    assert mode.largest <= plan.q_chunk * (N + 15)
    assert mode.largest < N * N // 8
    assert_matches_reference(out, k, k, v, (40, 40), 5.0)


# ---- band split: far keys without the bias, merged through log-sum-exp ----


@pytest.mark.parametrize(
    "sigma,bias_scale", [(5.0, 1.0), (0.5, 1.0), (1.0, 50.0), (2.0, -3.0), (5.0, 1e-9)], ids=str
)
def test_band_radius_bound_is_tight(sigma, bias_scale):
    import math

    from naclip_kernels.torch_backend import BAND_EPS, band_radius

    R = band_radius(sigma, bias_scale)
    if abs(bias_scale) <= BAND_EPS:
        assert R == -1
        return
    g = lambda d: abs(bias_scale) * math.exp(-d * d / (2 * sigma * sigma))
    assert g(R + 1) < BAND_EPS <= g(R)
    if (sigma, bias_scale) == (5.0, 1.0):
        assert R == 28


@pytest.mark.parametrize(
    "sigma,bias_scale,gh",
    [(5.0, 1.0, 64), (5.0, 1.0, 20), (0.5, 1.0, 9), (1.0, 50.0, 128), (2.0, -3.0, 7), (80.0, 8.0, 300)],
    ids=str,
)
def test_band_radius_vs_triton_band_rows(sigma, bias_scale, gh):
    """The documented relation between the two rounding choices (torch: tight R; Triton: R + 1, clamped)."""
    from naclip_kernels._bias import band_rows
    from naclip_kernels.torch_backend import band_radius

    assert band_rows(sigma, bias_scale, gh) == min(band_radius(sigma, bias_scale) + 1, gh - 1)


def _count_flash(monkeypatch):
    import naclip_kernels.torch_backend as tb

    calls = []
    real = tb._flash_cpu
    assert real is not None, "torch lacks _scaled_dot_product_flash_attention_for_cpu"

    def spy(q, k, v, **kw):
        calls.append((k.shape[2], kw.get("attn_mask") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(tb, "_flash_cpu", spy)
    return calls


@pytest.mark.parametrize("P", [0, 1, 3], ids=lambda p: f"P{p}")
@pytest.mark.parametrize("sigma,bias_scale", [(0.5, 1.0), (1.0, 40.0), (1.5, -3.0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_band_split_matches_reference(monkeypatch, dtype, sigma, bias_scale, P):
    calls = _count_flash(monkeypatch)
    grid = (30, 4)
    q, k, v = _qkv(2, 2, P + 120, 16, dtype, seed=P)
    for qq in (k, q):
        out = run(qq, k, v, grid, sigma, num_prefix_tokens=P, bias_scale=bias_scale, budget=20000)
        assert_matches_reference(out, qq, k, v, grid, sigma, num_prefix_tokens=P, bias_scale=bias_scale)
    masked = [n for n, has_mask in calls if has_mask]
    unmasked = [n for n, has_mask in calls if not has_mask]
    assert masked and unmasked, "the band split was not exercised"
    assert max(masked) < P + 120  # the bias is never evaluated over all keys


def test_band_split_nan_in_far_key_propagates(monkeypatch):
    calls = _count_flash(monkeypatch)
    q, k, v = _qkv(1, 2, 1 + 30 * 4, 16)
    kn = k.clone()
    kn[0, 0, 1 + 29 * 4, 0] = float("nan")  # last grid row: far from the first chunks' queries
    out = run(kn, kn, v, (30, 4), 0.5, budget=20000)
    assert calls and out[0, 0].isnan().all() and not out[0, 1].isnan().any()


def test_without_private_flash_op_falls_back(monkeypatch):
    import naclip_kernels.torch_backend as tb

    monkeypatch.setattr(tb, "_flash_cpu", None)
    q, k, v = _qkv(1, 2, 1 + 30 * 4, 16)
    out = run(k, k, v, (30, 4), 0.5, budget=20000)
    assert_matches_reference(out, k, k, v, (30, 4), 0.5)


def test_cached_bias_workspace_survives_inference_mode_switch():
    """The per-thread bias buffer is reused across calls; one first allocated under inference_mode must
    still be writable by a later call outside it (regression: 'Inplace update to inference tensor outside
    InferenceMode')."""
    from naclip_kernels.torch_backend import clear_workspace

    clear_workspace()
    g = torch.Generator().manual_seed(0)
    q1 = torch.randn(1, 2, 1 + 6 * 5, 16, generator=g)
    q2 = torch.randn(1, 2, 1 + 7 * 4, 16, generator=g)  # another grid: the cached buffer is refilled in place
    with torch.inference_mode():
        gaussian_attention(q1, q1, q1, (6, 5), 2.0, backend="torch")
    out = gaussian_attention(q2, q2, q2, (7, 4), 2.0, backend="torch")
    ref = reference_attention(q2, q2, q2, (7, 4), 2.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    clear_workspace()
