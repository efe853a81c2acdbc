"""Property-based fuzzing: the torch backend equals the dense reference on random shapes and parameters.

Deterministic in CI: ``derandomize=True`` (examples derived from the test itself), no example database, no
deadline (a shared 2-core CI box has erratic timings).
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layout_expect import in_q_order

from naclip_kernels import api, check_inputs, gaussian_attention, reference_attention
from naclip_kernels.torch_backend import plan_chunks, torch_attention

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TOL = {torch.float32: 3e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}  # see test_torch_backend.py


@st.composite
def problems(draw):
    gh = draw(st.integers(1, 9))
    gw = draw(st.integers(1, 9))
    P = draw(st.integers(0, 8))
    N = P + gh * gw
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 3, 8, 16, 24, 48, 64, 80]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))
    sigma = draw(st.one_of(st.none(), st.floats(0.2, 80.0)))
    use_grid = sigma is not None or draw(st.booleans())
    scale = draw(st.one_of(st.none(), st.just(0.0), st.floats(-1.0, 1.0)))
    bias_scale = draw(st.one_of(st.just(1.0), st.floats(-4.0, 8.0)))
    q_is_k = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "bnhd", "transposed", "expanded"]))
    budget = draw(st.one_of(st.none(), st.integers(1, 50_000)))
    seed = draw(st.integers(0, 2**16))
    return dict(
        gh=gh,
        gw=gw,
        P=P,
        N=N,
        B=B,
        H=H,
        D=D,
        dtype=dtype,
        sigma=sigma,
        use_grid=use_grid,
        scale=scale,
        bias_scale=bias_scale,
        q_is_k=q_is_k,
        layout=layout,
        budget=budget,
        seed=seed,
    )


def _make(p):
    g = torch.Generator().manual_seed(p["seed"])
    B, H, N, D = p["B"], p["H"], p["N"], p["D"]

    def one():
        if p["layout"] == "bnhd":
            return torch.randn(B, N, H, D, generator=g).transpose(1, 2)
        if p["layout"] == "transposed":
            return torch.randn(B, H, D, N, generator=g).transpose(-1, -2)
        if p["layout"] == "expanded":
            return torch.randn(1, H, N, D, generator=g).expand(B, H, N, D)
        return torch.randn(B, H, N, D, generator=g)

    q, k, v = (one().to(p["dtype"]) for _ in range(3))
    return (k if p["q_is_k"] else q), k, v


@FUZZ
@given(problems())
def test_torch_backend_matches_reference(p):
    q, k, v = _make(p)
    grid = (p["gh"], p["gw"]) if p["use_grid"] else None
    kw = dict(scale=p["scale"], num_prefix_tokens=p["P"], bias_scale=p["bias_scale"])
    spec = check_inputs(q, k, v, grid, p["sigma"], **kw)
    plan = plan_chunks(spec, p["budget"], min_rows=1)
    assert plan.q_chunk <= spec.N and plan.batch_chunk <= spec.B
    out = torch_attention(q, k, v, spec, budget_bytes=p["budget"], min_rows=1)
    ref = reference_attention(q.float(), k.float(), v.float(), grid, p["sigma"], **kw)
    assert out.shape == ref.shape and out.dtype == p["dtype"] and in_q_order(out, q)
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[p["dtype"]] * max(ref.abs().max().item(), 1e-6), (err, p)


@contextlib.contextmanager
def _default_from(source: str):
    """Make ``backend=None`` resolve through ``source`` (nothing set / the env var / set_default_backend);
    yields the api function expected to run on CPU tensors. Restores the env var and the default after."""
    with (
        mock.patch.dict(os.environ),
        mock.patch.object(api, "_default_backend", None),
    ):
        os.environ.pop(api.ENV_VAR, None)
        if source == "env-reference":
            os.environ[api.ENV_VAR] = "reference"
        elif source == "env-torch":
            os.environ[api.ENV_VAR] = " Torch "
        elif source == "set-reference":
            os.environ[api.ENV_VAR] = "torch"  # set_default_backend wins over the env var
            api.set_default_backend("reference")
        yield "reference_attention" if source.endswith("reference") else "torch_attention"


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(problems(), st.sampled_from(["unset", "env-torch", "env-reference", "set-reference"]))
def test_public_entry_point_default_backend(p, source):
    q, k, v = _make(p)
    grid = (p["gh"], p["gw"]) if p["use_grid"] else None
    kw = dict(scale=p["scale"], num_prefix_tokens=p["P"], bias_scale=p["bias_scale"])
    with (
        _default_from(source) as expected,
        mock.patch.object(api, "torch_attention", wraps=api.torch_attention) as t_spy,
        mock.patch.object(api, "reference_attention", wraps=api.reference_attention) as r_spy,
    ):
        out = gaussian_attention(q, k, v, grid, p["sigma"], **kw)  # backend=None: the default selection
    ran = [name for name, spy in (("torch_attention", t_spy), ("reference_attention", r_spy)) if spy.called]
    assert ran == [expected], (source, ran)
    ref = reference_attention(q.float(), k.float(), v.float(), grid, p["sigma"], **kw)
    assert out.dtype == p["dtype"] and out.shape == ref.shape and torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[p["dtype"]] * max(ref.abs().max().item(), 1e-6), (err, p)
