"""The built-in patterns.  They go through the same registry users will use."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Pattern, Registry

ALL = (torch.float32, torch.float16, torch.bfloat16)

aten = torch.ops.aten


def _op_patterns():
    from ..codegen import (  # registers torch.ops.tile.*
        fused_softmax,
        layer_norm,
        matmul,
        rms_norm,
        softmax,
    )

    tile = torch.ops.tile

    def sm_check(self, dim, **_):
        return softmax.check(self, dim)

    def sm_bwd_check(grad_output, output, dim, **_):
        return softmax.check(grad_output, dim) or softmax.check(output, dim)

    def ln_check(input, normalized_shape, weight, bias, **_):
        return layer_norm.check_layer_norm(input, normalized_shape, weight, bias)

    def ln_bwd_check(grad_out, input, normalized_shape, weight, bias, **_):
        return layer_norm.check_layer_norm(input, normalized_shape, weight, bias) or (
            None if grad_out.dtype == input.dtype else "grad dtype differs from input dtype"
        )

    def rms_check(input, normalized_shape, weight, **_):
        return rms_norm.check_rms_norm(input, normalized_shape, weight)

    def mm_check(self, mat2, **_):
        return matmul.check(self, mat2)

    def addmm_check(self, mat1, mat2, **_):
        return matmul.check(mat1, mat2, self)

    def baddbmm_check(self, batch1, batch2, **_):
        return matmul.check(batch1, batch2, self)

    pats = [
        ("softmax", aten._softmax.default, tile.softmax.default, sm_check),
        ("log_softmax", aten._log_softmax.default, tile.log_softmax.default, sm_check),
        (
            "softmax_backward",
            aten._softmax_backward_data.default,
            tile.softmax_backward.default,
            sm_bwd_check,
        ),
        (
            "log_softmax_backward",
            aten._log_softmax_backward_data.default,
            tile.log_softmax_backward.default,
            sm_bwd_check,
        ),
        ("layer_norm", aten.native_layer_norm.default, tile.layer_norm.default, ln_check),
        (
            "layer_norm_backward",
            aten.native_layer_norm_backward.default,
            tile.layer_norm_backward.default,
            ln_bwd_check,
        ),
        ("mm", aten.mm.default, tile.mm.default, mm_check),
        ("addmm", aten.addmm.default, tile.addmm.default, addmm_check),
        ("bmm", aten.bmm.default, tile.bmm.default, mm_check),
        ("baddbmm", aten.baddbmm.default, tile.baddbmm.default, baddbmm_check),
    ]
    if hasattr(aten, "_safe_softmax"):  # attention's math path (an SDPA's decomposition)

        def safe_check(self, dim, dtype=None, **_):
            return fused_softmax.check_safe(self, dim, dtype)

        pats.append(
            ("safe_softmax", aten._safe_softmax.default, tile.safe_softmax.default, safe_check)
        )
    if hasattr(aten, "_fused_rms_norm"):
        pats.append(
            ("fused_rms_norm", aten._fused_rms_norm.default, tile.rms_norm.default, rms_check)
        )
    if hasattr(aten, "_fused_rms_norm_backward"):

        def rms_bwd_check(grad_out, input, normalized_shape, weight, **_):
            return rms_norm.check_rms_norm(input, normalized_shape, weight)

        pats.append(
            (
                "fused_rms_norm_backward",
                aten._fused_rms_norm_backward.default,
                tile.rms_norm_backward.default,
                rms_bwd_check,
            )
        )
    return pats


# --- RMS norm written out (what F.rms_norm's composite and HF's LlamaRMSNorm trace to) ---


def _rms_examples(dtype):
    return (torch.randn(4, 8, dtype=dtype), torch.randn(8, dtype=dtype))


def _rms_check(x, w, eps, dim=-1, **_):
    from ..codegen import rms_norm

    if _trailing(dim, x) != 1:  # (dim may be a list: a norm over several dims)
        return f"normalizes over dim {dim}, the kernel normalizes the last dim"
    if w is not None and tuple(w.shape) != (x.shape[-1],):
        return f"weight shape {tuple(w.shape)} is not ({x.shape[-1]},)"
    return rms_norm.check_rms_norm(x, [x.shape[-1]], w)


def _rms_derive(x, **_):
    """x's last size, symbolic as it is: the rewrite reads a symbolic size from the
    graph (``aten.sym_size``), so one graph serves every hidden size, with no guard."""
    return {"normalized_shape": [x.shape[-1]]}


def _rms_replacement(x, w, eps, normalized_shape, dim=-1):
    return torch.ops.tile.rms_norm(x, normalized_shape, w, eps)[0]


def _rms_functional(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _rms_functional_noweight(x, eps, dims):
    return F.rms_norm(x, tuple(x.shape[len(x.shape) - len(dims) :]), None, eps)


def _rms_plain_noweight(x, eps, dim):
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps)


def _rms_examples_noweight(dtype):
    return (torch.randn(4, 8, dtype=dtype),)


def _trailing(dims, x) -> int | None:
    """How many trailing dims ``dims`` covers, or None when it is not a trailing run."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    nd = max(x.dim(), 1)
    canon = sorted(d % nd for d in dims)
    k = len(canon)
    return k if canon == list(range(nd - k, nd)) else None


def _rms_check_noweight(x, eps, dim=-1, dims=None, **_):
    from ..codegen import rms_norm

    k = _trailing(dims if dims is not None else dim, x)
    if k is None:
        return f"normalizes over dims {dims if dims is not None else dim}, not the trailing dims"
    shape = list(x.shape[x.dim() - k :])
    return rms_norm.check_rms_norm(x, shape, None)


def _rms_derive_noweight(x, dim=-1, dims=None, **_):
    """x's trailing sizes the norm covers, symbolic as they are (see ``_rms_derive``)."""
    k = _trailing(dims if dims is not None else dim, x)
    return {"normalized_shape": list(x.shape[x.dim() - k :])}


def _rms_replacement_noweight(x, eps, normalized_shape, dim=-1, dims=None):
    return torch.ops.tile.rms_norm(x, normalized_shape, None, eps)[0]


def _rms_llama(x, w, eps, dim):
    h = x.to(torch.float32)
    var = h.pow(2).mean(dim, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(x.dtype)


def _rms_t5(x, w, eps, dim):
    """HF's T5LayerNorm (and its copies) with half weights: the variance in fp32, but
    the fp16/bf16 input times the fp32 rsqrt (promoted: the same fp32 values as
    Llama's upcast input), rounded to the weight's dtype, then weighted.  In fp32 it
    traces as ``rms_norm_llama`` does, so it is registered for half dtypes only."""
    var = x.to(torch.float32).pow(2).mean(dim, keepdim=True)
    return w * (x * torch.rsqrt(var + eps)).to(w.dtype)


def _rms_plain(x, w, eps, dim):
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps) * w


def register_all(reg: Registry) -> None:
    for name, search, repl, check in _op_patterns():
        reg.add(
            Pattern(
                name=name,
                search=search,
                replacement=repl,
                check=check,
                builtin=True,
                origin=f"{__name__}:{name}",
            )
        )
    eps_dim = {"eps": (1e-6, 1e-5), "dim": (-1, 0)}
    written = [
        # F.rms_norm / torch.rms_norm: the composite AOTAutograd traces them to
        (
            "rms_norm",
            _rms_functional,
            _rms_examples,
            _rms_check,
            _rms_replacement,
            None,
            {"eps": (1e-6, 1e-5)},
        ),
        (
            "rms_norm_noweight",
            _rms_functional_noweight,
            _rms_examples_noweight,
            _rms_check_noweight,
            _rms_replacement_noweight,
            _rms_derive_noweight,
            {"eps": (1e-6, 1e-5), "dims": ((-1,), (-2, -1))},
        ),
        # written out by hand, as HF's LlamaRMSNorm and many others do
        ("rms_norm_llama", _rms_llama, _rms_examples, _rms_check, _rms_replacement, None, eps_dim),
        ("rms_norm_t5", _rms_t5, _rms_examples, _rms_check, _rms_replacement, None, eps_dim),
        (
            "rms_norm_written",
            _rms_plain,
            _rms_examples,
            _rms_check,
            _rms_replacement,
            None,
            eps_dim,
        ),
        (
            "rms_norm_written_noweight",
            _rms_plain_noweight,
            _rms_examples_noweight,
            _rms_check_noweight,
            _rms_replacement_noweight,
            _rms_derive_noweight,
            eps_dim,
        ),
    ]
    for name, search, examples, check, replacement, derive, scalars in written:
        reg.add(
            Pattern(
                name=name,
                dtypes=(torch.float16, torch.bfloat16) if name == "rms_norm_t5" else ALL,
                search=search,
                replacement=replacement,
                check=check,
                example_inputs=examples,
                scalars=scalars,
                derive=derive or _rms_derive,
                priority=10,  # a whole norm beats its pieces
                builtin=True,
                origin=f"{__name__}:{name}",
            )
        )
