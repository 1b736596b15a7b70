"""decode_config's `pdl` (programmatic dependent launch): which kernels a step launches with it, and when.

The kernels' own side (the wait ahead of any memory access, the trigger, the weights' L2 prefetch) is checked on the
compiled code (tests/kernels/test_sm90_compile.py), and a PDL chain replayed in a CUDA graph on a GPU
(test_decode_linear.py). Here: the switch, and every launch site passing launch_pdl and PDL together (a kernel
launched early that does not wait would race; one that waits but is never launched early gains nothing)."""

import pytest
import torch

from kernels import decode_config as dc
from kernels import decode_linear, paged_attention, rmsnorm, rotary, sampling, swiglu
from kernels.decode_config import set_decode_config


def test_the_switch_is_off_by_default_and_on_sm90_gpus_only(monkeypatch):
    """pdl_enabled: False by default; with pdl 1, True on an sm_90+ GPU only (never on the CPU or an sm_80 GPU, which
    has no programmatic dependent launch); a per-call value wins; 2 is refused with the parameter named."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    assert dc.decode_config(1, 128, 2)["pdl"] == 0 and not dc.pdl_enabled(cuda) and dc.pdl_enabled(cuda, 1)
    try:
        set_decode_config(pdl=1)
        assert dc.pdl_enabled(cuda) and not dc.pdl_enabled(cpu) and not dc.pdl_enabled(cuda, 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 0))
        assert not dc.pdl_enabled(cuda)
    finally:
        set_decode_config()
    with pytest.raises(ValueError, match="pdl must be 0 or 1"):
        set_decode_config(pdl=2)


class _Recorder:
    """Stands in for a kernel: records what each launch was given (PDL, launch_pdl)."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, kw.get("PDL"), kw.get("launch_pdl")))


def _paged():
    q = torch.randn(2, 4, 64)
    kc, vc = torch.randn(8, 16, 2, 64), torch.randn(8, 16, 2, 64)
    tables = torch.arange(8, dtype=torch.int32).view(2, 4)
    paged_attention.paged_decode_attention(q, kc, vc, tables, torch.tensor([50, 9], dtype=torch.int32), num_splits=2)


def _rotary():
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    rotary.launch_rotary(k, v, torch.arange(3), k_out=torch.empty_like(k))


LAUNCHES = {  # module, its kernels (as it names them), a call that launches each once
    "decode_linear": (decode_linear, ["_decode_linear_kernel"], lambda: decode_linear.decode_linear(
        torch.randn(3, 64), torch.randn(32, 64))),
    "paged_attention": (paged_attention, ["_paged_decode_kernel", "_paged_decode_reduce_kernel"], _paged),
    "rmsnorm": (rmsnorm, ["_rmsnorm_fwd_kernel"], lambda: rmsnorm.rms_norm(torch.randn(3, 64), torch.ones(64))),
    "swiglu": (swiglu, ["_swiglu_fwd_kernel"], lambda: swiglu.swiglu(torch.randn(3, 64))),
    "rotary": (rotary, ["_rotary_kernel"], _rotary),
    "sampling": (sampling, ["_kth_largest_kernel", "_gumbel_sample_kernel"], lambda: sampling.gumbel_sample(
        logits := torch.randn(3, 100), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0.7,
        sampling.kth_largest(logits, 5))),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_every_decode_kernel_launch_carries_both_or_neither(name, monkeypatch):
    """With the switch on where PDL exists, each decode-step kernel is launched with launch_pdl and its PDL constant
    (its wait and trigger); otherwise with neither (every site takes both from decode_config.pdl_args)."""
    module, kernels, call = LAUNCHES[name]
    calls = []
    for k in kernels:
        monkeypatch.setattr(module, k, _Recorder(k, calls))
    for on in (False, True):
        monkeypatch.setattr(dc, "pdl_enabled", lambda dev, value=None, on=on: on)  # (what pdl_args asks)
        calls.clear()
        with torch.no_grad():
            call()
        assert calls == [(k, on, True if on else None) for k in kernels], calls
