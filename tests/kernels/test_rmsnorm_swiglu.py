"""kernels.rmsnorm and kernels.swiglu against float64 references and HF's own layers (Triton interpreter on CPU)."""

import pytest
import torch

from kernels import dispatch, reference
from kernels.rmsnorm import add_rms_norm, rms_norm
from kernels.swiglu import swiglu, swiglu_backward

TOLS = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every float tensor the launchers allocate with torch.empty starts as NaN: an unwritten element fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def _grads(fn, inputs, dy):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (37, 1000), (3, 5, 96)])
def test_rms_norm_forward_backward(dtype, shape, poisoned_outputs):
    """Odd hidden sizes (1000: masked columns), one row, a 3-D input; forward and both gradients vs float64."""
    x = torch.randn(shape).to(dtype)
    w = (1.0 + 0.1 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape).to(dtype)
    out, (dx, dw) = _grads(lambda x, w: rms_norm(x, w, 1e-5), (x, w), dy)
    ref, (rdx, rdw) = _grads(lambda x, w: reference.rms_norm(x, w, 1e-5), (x.double(), w.double()), dy.double())
    assert out.dtype == dx.dtype == dw.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOLS[dtype])
    torch.testing.assert_close(dx.double(), rdx, **TOLS[dtype])
    # dweight sums over every row (values up to ~20 here), so its error scales with its largest value: the
    # rounding of its dtype there (measured: fp32 ~2e-7 of the largest value, bf16 ~3e-3, fp16 ~5e-4)
    rel = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(dw.double(), rdw, atol=rel * rdw.abs().max().item(), rtol=0)


def test_a_strided_norm_weight_reads_as_its_values():
    """A weight passed as a view with a stride (a slice of a packed buffer) is read as its values (the kernels
    read it with unit stride: 1.2 relative error, forward and backward)."""
    x, dy = torch.randn(9, 96), torch.randn(9, 96)
    packed = 1.0 + 0.1 * torch.randn(192)
    out, (dx, dw) = _grads(lambda x, w: rms_norm(x, w, 1e-5), (x, packed[::2]), dy)
    ref, (rdx, rdw) = _grads(lambda x, w: reference.rms_norm(x, w, 1e-5), (x.double(), packed[::2].double()),
                             dy.double())  # fmt: skip
    for got, want in ((out, ref), (dx, rdx), (dw, rdw)):
        torch.testing.assert_close(got.double(), want, **TOLS[torch.float32])
    y, _ = add_rms_norm(x, dy, packed[::2])
    torch.testing.assert_close(
        y.double(), reference.rms_norm((x + dy).double(), packed[::2].double()), **TOLS[torch.float32]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (37, 1000), (3, 5, 96)])
@pytest.mark.parametrize("use", ["both", "norm", "sum"])
def test_add_rms_norm_forward_backward(dtype, shape, use, poisoned_outputs):
    """h = x + delta and rms_norm(h) in one pass: both outputs, and the gradients of x, delta and weight when the
    loss uses both outputs, only the norm, or only the sum; against float64."""
    x, delta, dy, dh = (torch.randn(shape).to(dtype) for _ in range(4))
    w = (1.0 + 0.1 * torch.randn(shape[-1])).to(dtype)

    def loss(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y, h = fn(*leaves)
        terms = {"both": [(y, dy), (h, dh)], "norm": [(y, dy)], "sum": [(h, dh)]}[use]
        sum((out * g.to(out.dtype)).sum() for out, g in terms).backward()
        return y.detach(), h.detach(), [t.grad for t in leaves]

    y, h, grads = loss(lambda a, b, c: add_rms_norm(a, b, c, 1e-5), x, delta, w)
    ry, rh, rgrads = loss(lambda a, b, c: reference.add_rms_norm(a, b, c, 1e-5), x.double(), delta.double(), w.double())
    assert torch.equal(h, x + delta)  # the sum rounded once, as torch's add
    assert torch.equal(y, rms_norm(h, w, 1e-5))  # the rounded sum normalised (HF's residual stream, then its norm)
    torch.testing.assert_close(y.double(), ry, **TOLS[dtype])
    torch.testing.assert_close(h.double(), rh, **TOLS[dtype])
    if use == "sum":
        assert grads[2] is None
        grads, rgrads = grads[:2], rgrads[:2]
    for got, want in zip(grads, rgrads):
        torch.testing.assert_close(got.double(), want, atol=TOLS[dtype]["atol"] * max(1.0, want.abs().max().item()),
                                   rtol=TOLS[dtype]["rtol"])  # fmt: skip


# (tests/conftest.py makes the interpreter round fp32 -> bf16 to nearest, as the GPU does)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_matches_hf_in_half_precision(dtype):
    """The same arithmetic as transformers' LlamaRMSNorm in half precision (round after normalising, then scale)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(512, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1.0 + 0.1 * torch.randn(512))
    x = torch.randn(70, 512).to(dtype) * 3
    got, want = rms_norm(x, hf.weight.detach(), 1e-5), hf(x).detach()
    # bit-identical except where the fp32 row sums, added in another order, round a value the other way
    assert (got != want).float().mean() < 0.01
    torch.testing.assert_close(got, want, atol=0, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_weight_grad_sums_the_rounded_normalised_rows(dtype):
    """dweight = sum over rows of dy * n with n rounded to the input dtype, as autograd through HF's `weight *
    hidden.to(input_dtype)` has it: within one rounding of the dtype (measured 2^-8 in bf16, 2^-11 in fp16), while
    the unrounded n differs by 0.06-0.08 in bf16 and ~0.008 in fp16."""
    x = (torch.randn(300, 512) * 3).to(dtype)
    w, dy = (1 + 0.1 * torch.randn(512)).to(dtype), torch.randn(300, 512).to(dtype)
    _, (_, dw) = _grads(lambda x, w: rms_norm(x, w, 1e-5), (x, w), dy)
    xf = x.float()
    n = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-5)).to(dtype)
    want = (dy.double() * n.double()).sum(0)
    err = ((dw.double() - want).abs() / want.abs().clamp(min=1)).max().item()
    assert err < {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype], err


def test_rms_norm_many_rows_weight_grad_partials():
    """More row blocks than backward programs: every program walks several blocks into its dweight partial."""
    x, w, dy = torch.randn(300, 64), torch.rand(64) + 0.5, torch.randn(300, 64)
    _, (dx, dw) = _grads(lambda x, w: rms_norm(x, w, 1e-6), (x, w), dy)
    _, (rdx, rdw) = _grads(lambda x, w: reference.rms_norm(x, w, 1e-6), (x.double(), w.double()), dy.double())
    torch.testing.assert_close(dx.double(), rdx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw.double(), rdw, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2 * 48), (37, 2 * 1100), (2, 3, 2 * 64)])
def test_swiglu_forward_backward(dtype, shape, poisoned_outputs):
    """Widths that do not fill a column block (1100), one row, a 3-D input; the fused [gate | up] gradient."""
    gu = (2 * torch.randn(shape)).to(dtype)
    dy = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
    out, (dgu,) = _grads(swiglu, (gu,), dy)
    ref, (rdgu,) = _grads(reference.swiglu, (gu.double(),), dy.double())
    assert out.shape == ref.shape and dgu.shape == gu.shape and dgu.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOLS[dtype])
    torch.testing.assert_close(dgu.double(), rdgu, **TOLS[dtype])


def test_swiglu_takes_fewer_rows_a_program_where_the_grid_would_leave_sms_idle(monkeypatch, poisoned_outputs):
    """The GPU's 4 rows a program at a decode step of 8 sequences (13,824 columns) on 132 SMs: 1 (112 programs, not
    28); at 64 sequences (224 programs) and a training micro-batch as tiled; and the kernels stay exact at 1 and 2
    rows a program."""
    from kernels import swiglu as sw

    monkeypatch.setattr(sw, "_BLOCK_ROWS", 4)  # (the GPU's tile; the interpreter's is 64)
    assert sw._launch(8, 13824, 132) == ((8, 14), 1)
    assert sw._launch(64, 13824, 132) == ((16, 14), 4)
    assert sw._launch(8192, 13824, 132) == ((2048, 14), 4)
    assert sw._launch(8, 13824, 0) == ((2, 14), 4)  # (no SM count: as tiled)
    real, seen = sw._launch, []
    monkeypatch.setattr(sw, "_launch", lambda n, c, sms: seen.append(real(n, c, 16)[1]) or real(n, c, 16))
    for shape in [(3, 2 * 1100), (9, 2 * 1100)]:  # 1 and 2 rows a program on a stand-in 16-SM GPU
        gu, dy = 2 * torch.randn(shape), torch.randn(shape[0], shape[1] // 2)
        out, (dgu,) = _grads(swiglu, (gu,), dy)
        ref, (rdgu,) = _grads(reference.swiglu, (gu.double(),), dy.double())
        torch.testing.assert_close(out.double(), ref, **TOLS[torch.float32])
        torch.testing.assert_close(dgu.double(), rdgu, **TOLS[torch.float32])
    assert seen == [1, 1, 2, 2], seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_strided_input_matches_hf_mlp_activation(dtype):
    """A column slice of a wider tensor (row stride != 2I), against HF's silu(gate) * up in half precision."""
    wide = torch.randn(9, 300).to(dtype)
    gu = wide[:, 10:210]
    gate, up = gu.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(swiglu(gu), want, atol=1e-3, rtol=8e-3 if dtype == torch.bfloat16 else 2e-3)
    assert (swiglu(gu) != want).float().mean() < 0.01


def test_reference_paths_and_errors():
    x = torch.randn(4, 32)
    with dispatch.reference_ops():
        torch.testing.assert_close(rms_norm(x, torch.ones(32)), reference.rms_norm(x, torch.ones(32)))
        torch.testing.assert_close(swiglu(x), reference.swiglu(x))
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(31))
    with pytest.raises(ValueError, match="share a dtype"):
        rms_norm(x, torch.ones(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be even"):
        swiglu(torch.randn(4, 33))
    gu = torch.randn(4, 6)
    for dy in (torch.randn(3, 4), torch.randn(4, 6), torch.randn(4, 3).long()):  # (as many elements, or not float)
        with pytest.raises(ValueError, match=r"dy must be a floating-point tensor of swiglu's output shape \(4, 3\)"):
            swiglu_backward(gu, dy)
    with pytest.raises(ValueError, match="must be even"):
        swiglu_backward(torch.randn(4, 5), torch.randn(4, 2))


def test_shapes_and_dtypes_the_kernels_do_not_take():
    """A 0-d weight or input, an integer input: a ValueError naming it; float64 is computed in float64 (the
    reference), not silently in the kernel's fp32."""
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(4, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="x must be a floating-point"):
        rms_norm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="gate_up must be a floating-point"):
        swiglu(torch.arange(8).view(2, 4))
    x, w = torch.randn(5, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x, w), want, atol=1e-12, rtol=1e-12)
    gu = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(swiglu(gu), torch.nn.functional.silu(gu[:, :12]) * gu[:, 12:], atol=1e-12, rtol=1e-12)


def test_rms_norm_layouts_empty_rows_and_a_mismatched_delta(poisoned_outputs):
    """x with a non-unit last stride (copied for the kernel), delta with another row stride than x (each read
    through its own), 0 rows (the weight's grad is zeros, not the unwritten partial sums); a delta of another
    dtype is named."""
    w = 1.0 + 0.1 * torch.randn(40)
    x = torch.randn(40, 7).t()  # [7, 40], last stride 7
    dy = torch.randn(7, 40)
    out, (dx, _) = _grads(lambda x, w: rms_norm(x, w), (x, w), dy)
    ref, (rdx, _) = _grads(lambda x, w: reference.rms_norm(x, w), (x.double(), w.double()), dy.double())
    torch.testing.assert_close(out.double(), ref, **TOLS[torch.float32])
    torch.testing.assert_close(dx.double(), rdx, **TOLS[torch.float32])
    x = torch.randn(7, 40)
    delta = torch.randn(7, 96)[:, 3:43]  # row stride 96
    y, h = add_rms_norm(x, delta, w)
    torch.testing.assert_close(h, x + delta, atol=0, rtol=0)
    torch.testing.assert_close(y.double(), reference.rms_norm((x + delta).double(), w.double()), **TOLS[torch.float32])
    _, (dx, dw) = _grads(lambda x, w: rms_norm(x, w), (torch.randn(0, 40), w), torch.randn(0, 40))
    assert dx.shape == (0, 40) and torch.equal(dw, torch.zeros(40))
    with pytest.raises(ValueError, match="must match"):
        add_rms_norm(x, delta.double(), w)


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_swiglu_input_and_grad_layouts(layout):
    """gate_up with a row stride != 2I (the grad buffer is contiguous: each read through its own strides) or with
    a non-unit last stride; the output's grad arriving transposed (last stride != 1)."""
    n, inter = 5, 36
    base = torch.randn(n, 2 * inter + 6) if layout == "row_strided" else torch.randn(2 * inter, n)
    leaf = base.requires_grad_(True)
    gate_up = leaf[:, 3 : 3 + 2 * inter] if layout == "row_strided" else leaf.t()
    g = torch.randn(inter, n)  # dy = g.t()
    y = swiglu(gate_up)
    (grad,) = torch.autograd.grad((y.t() * g).sum(), leaf)
    gu = gate_up.detach().double().requires_grad_(True)
    ry = reference.swiglu(gu)
    (rgrad,) = torch.autograd.grad((ry.t() * g.double()).sum(), gu)
    torch.testing.assert_close(y.double(), ry, **TOLS[torch.float32])
    got = grad[:, 3 : 3 + 2 * inter] if layout == "row_strided" else grad.t()
    torch.testing.assert_close(got.double(), rgrad, **TOLS[torch.float32])


def test_rms_norm_backward_reads_strided_x_and_weight_through_their_strides():
    """Backward with x a row-strided view (row stride 2H: the kernel reads x and the contiguous dy, each through
    its own row stride) and the weight a strided view of a packed buffer (made contiguous for the kernel, which
    reads it with unit stride); the leaves are the wide buffers, so the views reach the kernel as they are (_grads
    clones its inputs, which makes a strided weight contiguous)."""
    n, hdim = 9, 96
    x_buf = torch.randn(n, 2 * hdim, requires_grad=True)
    packed = (1.0 + 0.1 * torch.randn(2 * hdim)).requires_grad_(True)
    x, w = x_buf[:, :hdim], packed[::2]
    assert x.stride(0) == 2 * hdim and w.stride(0) == 2
    dy = torch.randn(n, hdim)
    y = rms_norm(x, w, 1e-5)
    gx, gw = torch.autograd.grad((y * dy).sum(), (x_buf, packed))
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    rdx, rdw = torch.autograd.grad((reference.rms_norm(xd, wd, 1e-5) * dy.double()).sum(), (xd, wd))
    torch.testing.assert_close(gx[:, :hdim].double(), rdx, **TOLS[torch.float32])
    assert torch.equal(gx[:, hdim:], torch.zeros(n, hdim)) and torch.equal(gw[1::2], torch.zeros(hdim))
    torch.testing.assert_close(gw[::2].double(), rdw, atol=1e-6 * rdw.abs().max().item(), rtol=0)


def test_a_hidden_size_past_the_kernels_tile_takes_the_reference(monkeypatch):
    """Past _MAX_HIDDEN (the kernels hold the whole hidden dim in one tile: 16384 columns; 64 here) rms_norm and
    add_rms_norm both run the reference, and still give its values."""
    from kernels import rmsnorm

    monkeypatch.setattr(rmsnorm, "_MAX_HIDDEN", 64)
    calls = []
    for name in ("rms_norm", "add_rms_norm"):
        real = getattr(reference, name)
        monkeypatch.setattr(
            reference, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    x, delta, w = torch.randn(3, 96), torch.randn(3, 96), 1.0 + 0.1 * torch.randn(96)
    y = rms_norm(x, w)
    assert calls == ["rms_norm"]
    calls.clear()
    y2, h = add_rms_norm(x, delta, w)
    assert calls[:1] == ["add_rms_norm"]  # (which may call reference.rms_norm)
    torch.testing.assert_close(y.double(), reference.rms_norm(x.double(), w.double()), **TOLS[torch.float32])
    torch.testing.assert_close(h, x + delta, atol=0, rtol=0)
    torch.testing.assert_close(y2.double(), reference.rms_norm(h.double(), w.double()), **TOLS[torch.float32])
    x, w = torch.randn(3, 64), torch.ones(64)  # at the limit: the kernels
    calls.clear()
    rms_norm(x, w), add_rms_norm(x, x, w)
    assert calls == []
