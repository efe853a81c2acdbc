"""gaussian_attention: validation errors, backend dispatch, the global default and its env var."""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch
from layout_expect import in_q_order

import naclip_kernels
import naclip_kernels.api as api
from naclip_kernels import (
    available_backends,
    check_inputs,
    gaussian_attention,
    get_default_backend,
    reference_attention,
    set_default_backend,
)


@pytest.fixture(autouse=True)
def _clean_default(monkeypatch):
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    set_default_backend(None)
    yield
    set_default_backend(None)


def _qkv(B=1, H=2, N=1 + 12, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))


# ---- public surface ----


def test_public_surface():
    for name in naclip_kernels.__all__:
        assert hasattr(naclip_kernels, name), name
    assert {
        "gaussian_attention",
        "gaussian_bias",
        "reference_attention",
        "reference_attention_probs",
        "set_default_backend",
        "get_default_backend",
        "available_backends",
    } <= set(naclip_kernels.__all__)
    assert (importlib.resources.files("naclip_kernels") / "py.typed").is_file()


def test_kernels_package_does_not_import_naclip_or_open_clip():
    import subprocess

    code = (
        "import sys, naclip_kernels\n"
        "bad = [m for m in ('naclip', 'open_clip', 'PIL', 'triton', 'naclip_kernels.triton') "
        "if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"import naclip_kernels pulled in: {out.stdout.strip()}"


# ---- dispatch ----


def _spy(monkeypatch, attr):
    calls = []
    real = getattr(api, attr)

    def spy(*a, **kw):
        calls.append(attr)
        return real(*a, **kw)

    monkeypatch.setattr(api, attr, spy)
    return calls


def test_auto_on_cpu_uses_torch_backend(monkeypatch):
    calls = _spy(monkeypatch, "torch_attention")
    q, k, v = _qkv()
    out = gaussian_attention(k, k, v, (3, 4), 2.0)
    assert calls == ["torch_attention"]
    torch.testing.assert_close(out, reference_attention(k, k, v, (3, 4), 2.0), atol=1e-5, rtol=1e-5)
    assert get_default_backend() == "auto"


@pytest.mark.parametrize("backend", ["torch", "reference", "auto", "TORCH", " reference "])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forced_cpu_backends_output_contract(backend, dtype):
    q, k, v = _qkv(2, 3, 1 + 3 * 5, 32, dtype)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous view
    out = gaussian_attention(q_view, k, v, (3, 5), 5.0, backend=backend)
    assert out.shape == (2, 3, 16, 32) and out.dtype == dtype and in_q_order(out, q_view)
    ref = reference_attention(q.float(), k.float(), v.float(), (3, 5), 5.0)
    tol = {torch.float32: 3e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()


def test_set_default_backend_and_reset(monkeypatch):
    calls = _spy(monkeypatch, "reference_attention")
    q, k, v = _qkv()
    set_default_backend("reference")
    assert get_default_backend() == "reference"
    gaussian_attention(k, k, v, (3, 4), 2.0)
    assert calls == ["reference_attention"]
    gaussian_attention(k, k, v, (3, 4), 2.0, backend="torch")  # explicit argument wins over the default
    assert calls == ["reference_attention"]
    set_default_backend(None)
    assert get_default_backend() == "auto"


def test_env_var_read_lazily(monkeypatch):
    calls = _spy(monkeypatch, "reference_attention")
    q, k, v = _qkv()
    monkeypatch.setenv("NACLIP_ATTN_BACKEND", "reference")  # after import: must still be honoured
    assert get_default_backend() == "reference"
    gaussian_attention(k, k, v, (3, 4), 2.0)
    assert calls == ["reference_attention"]
    set_default_backend("torch")  # the function wins over the env var
    gaussian_attention(k, k, v, (3, 4), 2.0)
    assert calls == ["reference_attention"]
    set_default_backend(None)
    monkeypatch.setenv("NACLIP_ATTN_BACKEND", "")
    assert get_default_backend() == "auto"


def test_bad_env_var_names_it(monkeypatch):
    monkeypatch.setenv("NACLIP_ATTN_BACKEND", "cuda-fast")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"NACLIP_ATTN_BACKEND.*'cuda-fast'"):
        gaussian_attention(k, k, v, (3, 4), 2.0)


@pytest.mark.parametrize("name", ["flash", "", "tritonn"])
def test_unknown_backend_name(name):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'triton', 'torch', 'reference'"):
        gaussian_attention(k, k, v, (3, 4), 2.0, backend=name)
    with pytest.raises(ValueError, match="backend must be one of"):
        set_default_backend(name)


@pytest.mark.parametrize("name", [3, b"torch", ("torch",)], ids=["int", "bytes", "tuple"])
def test_non_str_backend_is_type_error(name):
    q, k, v = _qkv()
    pattern = r"backend must be one of 'auto', 'triton', 'torch', 'reference'; got .* of type"
    with pytest.raises(TypeError, match=pattern):
        gaussian_attention(k, k, v, (3, 4), 2.0, backend=name)
    with pytest.raises(TypeError, match=pattern):
        set_default_backend(name)


def _install_fake_triton(monkeypatch, reasons):
    mod = types.ModuleType("naclip_kernels.triton")
    calls = []
    mod.unsupported_reasons = lambda q, k, v, spec: list(reasons)

    def triton_attention(q, k, v, spec):
        calls.append(spec)
        # return a non-contiguous fp32 tensor: the api must still honour the output contract
        out = reference_attention(
            q,
            k,
            v,
            spec.grid_hw,
            spec.sigma,
            scale=spec.scale,
            num_prefix_tokens=spec.num_prefix_tokens,
            bias_scale=spec.bias_scale,
        )
        return out.float().transpose(1, 2).contiguous().transpose(1, 2)

    mod.triton_attention = triton_attention
    monkeypatch.setitem(sys.modules, "naclip_kernels.triton", mod)
    return calls


def test_forced_triton_lists_every_reason(monkeypatch):
    _install_fake_triton(monkeypatch, ["head dim 512 > 256", "device cpu needs TRITON_INTERPRET=1"])
    q, k, v = _qkv()
    with pytest.raises(ValueError) as ei:
        gaussian_attention(k, k, v, (3, 4), 2.0, backend="triton")
    msg = str(ei.value)
    assert "backend='triton'" in msg and "head dim 512 > 256" in msg and "TRITON_INTERPRET=1" in msg


def test_forced_triton_runs_plugin_and_fixes_output(monkeypatch):
    calls = _install_fake_triton(monkeypatch, [])
    q, k, v = _qkv(dtype=torch.float16)
    out = gaussian_attention(q, k, v, (3, 4), 2.0, backend="triton", scale=0.0, bias_scale=3.0)
    assert len(calls) == 1 and calls[0].scale == 0.0 and calls[0].bias_scale == 3.0
    assert out.dtype == torch.float16 and in_q_order(out, q) and out.shape == q.shape


def test_triton_not_importable_is_a_reason(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *a, **kw):
        if name == "naclip_kernels.triton":
            raise ImportError("No module named 'triton'")
        return real_import(name, *a, **kw)

    monkeypatch.delitem(sys.modules, "naclip_kernels.triton", raising=False)
    monkeypatch.setattr(api.importlib, "import_module", fake_import)
    q, k, v = _qkv()
    with pytest.raises(
        ValueError, match=r"triton not installed/importable: ImportError: No module named 'triton'"
    ):
        gaussian_attention(k, k, v, (3, 4), 2.0, backend="triton")
    assert available_backends() == ["torch", "reference"]
    # auto never needs triton on CPU
    assert gaussian_attention(k, k, v, (3, 4), 2.0).shape == k.shape


def test_available_backends():
    got = available_backends()
    assert got[-2:] == ["torch", "reference"]
    assert set(got) <= {"triton", "torch", "reference"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_prefers_triton_when_supported():
    q, k, v = (t.cuda() for t in _qkv(dtype=torch.float16))
    out = gaussian_attention(k, k, v, (3, 4), 2.0)
    ref = reference_attention(k, k, v, (3, 4), 2.0)
    assert out.device.type == "cuda" and (out.float() - ref.float()).abs().max() < 1e-2


# ---- bad input -> clear errors ----

GOOD = dict(grid_hw=(3, 4), sigma=2.0, scale=None, num_prefix_tokens=1, bias_scale=1.0)


def _bad_cases():
    q, k, v = _qkv()
    N = q.shape[2]
    c = []
    c.append(("q_not_tensor", (q.numpy(), k, v), {}, TypeError, r"q must be a torch.Tensor"))
    c.append(("k_rank3", (q, k[0], v), {}, ValueError, r"k must have shape \[B, H, N, D\].*got 3 dims"))
    c.append(("v_rank5", (q, k, v[None]), {}, ValueError, r"v must have shape.*got 5 dims"))
    c.append(
        (
            "k_B",
            (q, k.expand(2, -1, -1, -1), v),
            {},
            ValueError,
            r"k must have the same shape.*\(2, 2, 13, 16\)",
        )
    )
    c.append(("v_H", (q, k, v[:, :1]), {}, ValueError, r"v must have the same shape.*\(1, 1, 13, 16\)"))
    c.append(("k_N", (q[:, :, :7], k, v), {"grid_hw": (2, 3)}, ValueError, r"k must have the same shape"))
    c.append(("v_D", (q, k, v[..., :8]), {}, ValueError, r"v must have the same shape.*\(1, 2, 13, 8\)"))
    c.append(
        (
            "q_int",
            (q.int(), k, v),
            {},
            TypeError,
            r"q must have dtype float16, bfloat16, float32 or float64; got torch.int32",
        )
    )
    c.append(("k_float64", (q, k.double(), v), {}, TypeError, r"same dtype; got q=torch.float32, k=torch.f"))
    c.append(
        ("mixed_dtypes", (q, k, v.half()), {}, TypeError, r"same dtype; got q=torch.float32.*v=torch.float16")
    )
    c.append(("meta_device", (q, k, v.to("meta")), {}, ValueError, r"same device; got q=cpu, k=cpu, v=meta"))
    c.append(
        (
            "empty_N",
            (q[:, :, :0], k[:, :, :0], v[:, :, :0]),
            {"grid_hw": None, "sigma": None},
            ValueError,
            r"B, H, N, D >= 1",
        )
    )
    c.append(
        (
            "grid_mismatch",
            (q, k, v),
            {"grid_hw": (4, 4)},
            ValueError,
            r"num_prefix_tokens \+ gh \* gw must equal N = 13.*1 \+ 4 \* 4 = 17",
        )
    )
    c.append(("prefix_mismatch", (q, k, v), {"num_prefix_tokens": 2}, ValueError, r"2 \+ 3 \* 4 = 14"))
    c.append(("grid_zero", (q, k, v), {"grid_hw": (0, 12)}, ValueError, r"grid_hw must be a pair.*gh=0"))
    c.append(("grid_negative", (q, k, v), {"grid_hw": (3, -4)}, ValueError, r"gw=-4"))
    c.append(("grid_float", (q, k, v), {"grid_hw": (3.0, 4)}, TypeError, r"gh=3.0 of type float"))
    c.append(("grid_bool", (q, k, v), {"grid_hw": (True, 12)}, TypeError, r"gh=True of type bool"))
    c.append(("grid_len3", (q, k, v), {"grid_hw": (1, 3, 4)}, ValueError, r"got 3 values"))
    c.append(("grid_int", (q, k, v), {"grid_hw": 12}, TypeError, r"grid_hw must be a pair.*got 12"))
    c.append(("grid_missing", (q, k, v), {"grid_hw": None}, ValueError, r"grid_hw must be given.*sigma=2.0"))
    c.append(
        (
            "prefix_negative",
            (q, k, v),
            {"num_prefix_tokens": -1},
            ValueError,
            r"num_prefix_tokens must be a non-negative int; got -1",
        )
    )
    c.append(("prefix_bool", (q, k, v), {"num_prefix_tokens": True}, TypeError, r"got True of type bool"))
    c.append(("prefix_float", (q, k, v), {"num_prefix_tokens": 1.0}, TypeError, r"got 1.0 of type float"))
    c.append(
        (
            "prefix_gt_N",
            (q, k, v),
            {"grid_hw": None, "sigma": None, "num_prefix_tokens": N + 1},
            ValueError,
            r"num_prefix_tokens must be <= N = 13 .*got 14",
        )
    )
    for name, s, exc, pat in [
        ("sigma_zero", 0.0, ValueError, r"sigma must be None or a finite number > 0.*got 0.0"),
        ("sigma_negative", -5, ValueError, r"got -5.0"),
        ("sigma_nan", math.nan, ValueError, r"got nan"),
        ("sigma_inf", math.inf, ValueError, r"got inf"),
        ("sigma_str", "5", TypeError, r"sigma must be .*got '5' of type str"),
        ("sigma_bool", True, TypeError, r"got True of type bool"),
        ("sigma_complex", 1j, TypeError, r"of type complex"),
        ("sigma_tensor_int", torch.tensor(5), TypeError, r"sigma must be a floating tensor .*torch.int64"),
        ("sigma_tensor_shape", torch.ones(3), ValueError, r"sigma must be a tensor of shape \[\] or \[H=2\]"),
        ("sigma_tensor_2d", torch.ones(1, 2), ValueError, r"got shape \(1, 2\)"),
        ("sigma_tensor_meta", torch.ones(2, device="meta"), ValueError, r"sigma must be on q's device cpu"),
        ("sigma_tensor_zero", torch.tensor([1.0, 0.0]), ValueError, r"finite values > 0.*\[1.0, 0.0\]"),
        ("sigma_tensor_nan", torch.tensor(math.nan), ValueError, r"sigma must hold finite values > 0"),
    ]:
        c.append((name, (q, k, v), {"sigma": s}, exc, pat))
    c.append(
        (
            "scale_nan",
            (q, k, v),
            {"scale": math.nan},
            ValueError,
            r"scale must be None or a finite number with \|scale\| <= 2\^64 \(~1.8e19\); got nan",
        )
    )
    c.append(("scale_str", (q, k, v), {"scale": "0.1"}, TypeError, r"scale must be"))
    c.append(
        (
            "bias_scale_inf",
            (q, k, v),
            {"bias_scale": -math.inf},
            ValueError,
            r"bias_scale must be a finite number with \|bias_scale\| <= 2\^64.*got -inf",
        )
    )
    c.append(("scale_1e38", (q, k, v), {"scale": 1e38}, ValueError, r"\|scale\| <= 2\^64 .*got 1e\+38"))
    c.append(("bias_scale_1e300", (q, k, v), {"bias_scale": 1e300}, ValueError, r"got 1e\+300"))
    c.append(
        (
            "bias_scale_tensor_big",
            (q, k, v),
            {"bias_scale": torch.tensor(1e30)},
            ValueError,
            r"bias_scale must hold finite values with \|bias_scale\| <= 2\^64",
        )
    )
    c.append(
        (
            "bias_scale_tensor_shape",
            (q, k, v),
            {"bias_scale": torch.ones(2, 1)},
            ValueError,
            r"bias_scale must be a tensor of shape \[\] or \[H=2\]; got shape \(2, 1\)",
        )
    )
    c.append(
        ("bias_scale_none", (q, k, v), {"bias_scale": None}, TypeError, r"bias_scale must be a finite number")
    )
    return c


@pytest.mark.parametrize("name,args,kw,exc,pattern", _bad_cases(), ids=[c[0] for c in _bad_cases()])
@pytest.mark.parametrize("entry", ["gaussian_attention", "reference_attention", "check_inputs"])
def test_bad_input_raises_clear_error(entry, name, args, kw, exc, pattern):
    fn = {
        "gaussian_attention": gaussian_attention,
        "reference_attention": reference_attention,
        "check_inputs": check_inputs,
    }[entry]
    call = dict(GOOD)
    call.update(kw)
    grid, sigma = call.pop("grid_hw"), call.pop("sigma")
    with pytest.raises(exc, match=pattern):
        fn(*args, grid, sigma, **call)


def test_grid_validated_even_without_sigma():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="must equal N"):
        gaussian_attention(q, k, v, (5, 5), None)
    # and a None grid is fine without sigma, at any N
    assert gaussian_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], None, None).shape == (1, 2, 5, 16)


def test_spec_fields():
    q, k, v = _qkv(dtype=torch.bfloat16)
    s = check_inputs(q, k, v, [3, 4], 5, scale=0, num_prefix_tokens=1, bias_scale=2)
    assert (s.B, s.H, s.N, s.D) == (1, 2, 13, 16)
    assert s.grid_hw == (3, 4) and s.sigma == 5.0 and isinstance(s.sigma, float)
    assert s.scale == 0.0 and s.bias_scale == 2.0 and s.num_prefix_tokens == 1
    assert s.dtype == torch.bfloat16 and s.device == torch.device("cpu") and s.has_bias
    assert check_inputs(q, k, v, None, None).scale == pytest.approx(16**-0.5)
    with pytest.raises(AttributeError):
        s.N = 3  # frozen
