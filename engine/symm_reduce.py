"""Tensor parallelism's small all-reduces through symmetric memory instead of NCCL (generation's, above all).

A decode step under TP sums each layer's output and down projections over the ranks: two all-reduces a layer of
batch x hidden numbers (80 a step at 13B, 10 KB to 2.6 MB each). NCCL spends ~10 to 25 us on each however few the
bytes (an estimate, to be measured): at the recipe's TP 8 with a batch of 64, ~1 to 2 ms a step beside the ~2.7 ms its
weights and cache take to read, a share that grows as the batch shrinks. Here every rank of a TP group keeps one
buffer in torch's symmetric memory (`torch.distributed._symmetric_memory`: each rank's GPU maps its NVLink peers'
copies), and a sum is one or two kernels over that buffer (torch's symm_mem ops, which vLLM and SGLang use for the
same sums):
- up to ONE_SHOT_BYTES, one-shot (one_shot_all_reduce_copy_out): each rank copies its part into its buffer, the
  ranks meet at a barrier, each reads every peer's part and sums it in registers (one launch; (tp - 1) x the bytes
  over NVLink a rank; latency-bound sizes);
- above, with NVSwitch multicast (an H100/H200 HGX node): multimem_all_reduce_, each rank reducing its 1/tp of the
  buffer in the switch and storing it to every rank at once; without multicast, two-shot (a reduce-scatter then an
  all-gather over the peers' buffers).

Off until a multi-GPU machine has timed it (TULU_SYMM_ALL_REDUCE=1; CUDA only): `python bench/tp_allreduce.py` under
torchrun times NCCL against each form at a decode step's sizes, and bench/rollout_throughput.py at TP 8 with it on and
off gives the step. Not the same bits as NCCL (another summation order over the ranks, in fp32 registers).

One stream at a time: the sums of a group run in its ranks' program order on one buffer (each form's closing
barrier lets the next sum write it), so two streams must not sum over one group at once (the engine's TP passes run on
the current stream).

The buffer is made once per TP group, every rank at once, outside a CUDA graph's capture: the generator prepares it
when it allocates its KV cache, for its largest decode step (max_num_seqs rows; a larger sum, a prefill, takes NCCL).
It is never replaced (captured decode graphs read its address); a later, larger request leaves it as it is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels.dispatch import env_int, env_switch

SYMM_ALL_REDUCE = env_switch("TULU_SYMM_ALL_REDUCE", False)
# the largest sum the one-shot form takes (its NVLink reads grow as (tp - 1) x the bytes; above it the switch's
# multicast or the two-shot form): a guess until bench/tp_allreduce.py has timed the three on a node
ONE_SHOT_BYTES = env_int("TULU_ONE_SHOT_BYTES", 256 * 1024)
# what the kernels take: bf16 or fp32, 16-byte aligned sizes and addresses (torch's ops check 4, and a copy's and the
# buffer's alignment must agree)
_DTYPES = (torch.bfloat16, torch.float32)
_ALIGN = 16
DEVICES = {"cuda"}  # where the buffer lives (a CPU test adds "cpu", with gloo standing in for torch's ops)


@dataclass
class Buffer:
    """One TP group's symmetric buffer: `tensor` (uint8, the same size on every rank), the group's name (by which
    torch's ops find the peers' mappings), whether the switch's multicast serves it, the group's size."""

    tensor: torch.Tensor
    name: str
    multicast: bool
    size: int

    @property
    def capacity(self) -> int:
        return self.tensor.numel()


_BUFFERS: dict[str, Buffer] = {}  # by group name
_FAILED: set[str] = set()  # groups whose buffer could not be made (NCCL for good, one warning)


# torch's ops, in one place (a CPU test stands gloo collectives in for them: tests/engine/tp_worker.py)
def _alloc(nbytes: int, device: torch.device) -> torch.Tensor:
    from torch.distributed import _symmetric_memory as symm

    return symm.empty(nbytes, dtype=torch.uint8, device=device)


def _rendezvous(t: torch.Tensor, group) -> bool:
    """Map every rank's buffer into this one's (collective); -> whether the switch's multicast serves it."""
    from torch.distributed import _symmetric_memory as symm

    from engine.parallel import _symm_group

    handle = symm.rendezvous(t, _symm_group(group))
    return bool(getattr(handle, "multicast_ptr", 0))


def _one_shot(buf: torch.Tensor, x: torch.Tensor, name: str, out: torch.Tensor) -> None:
    if hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):  # (torch 2.8 on: the copy in the same launch)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x, "sum", name, out)
    else:
        buf.copy_(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", name, out)


def _multimem(buf: torch.Tensor, name: str, out: torch.Tensor) -> None:
    torch.ops.symm_mem.multimem_all_reduce_(buf, "sum", name)
    out.copy_(buf)


def _two_shot(buf: torch.Tensor, name: str, out: torch.Tensor) -> None:
    torch.ops.symm_mem.two_shot_all_reduce_out(buf, "sum", name, out)


OPS = {"alloc": _alloc, "rendezvous": _rendezvous, "one_shot": _one_shot, "multimem": _multimem, "two_shot": _two_shot}


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def prepare(group, device: torch.device, nbytes: int) -> Buffer | None:
    """The TP group's symmetric buffer of at least `nbytes` (rounded up to 16), made at the first call: collective
    over `group` (every rank at once, outside a CUDA graph's capture). None where the sums stay NCCL's: the switch off,
    no group of several ranks, not on a GPU, or the buffer could not be made on some rank (every rank then warns
    once and keeps NCCL: the ranks must sum alike)."""
    if not SYMM_ALL_REDUCE or _group_size(group) == 1 or device.type not in DEVICES:
        return None
    name = group.group_name
    if name in _BUFFERS or name in _FAILED:
        return _BUFFERS.get(name)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("symm_reduce.prepare inside a CUDA graph's capture: prepare the buffer before capturing")
    from engine.distributed import agree

    # (the same size on every rank: the largest any asked for)
    (nbytes,) = agree([-(-max(int(nbytes), _ALIGN) // _ALIGN) * _ALIGN], "max", group)
    error, t, multicast = None, None, False
    try:  # (each rank allocates alone first: a rank that cannot must not leave the others in the rendezvous)
        t = OPS["alloc"](nbytes, device)
    except Exception as e:
        error = e
    (failed,) = agree([int(error is not None)], "max", group)
    if not failed:
        try:
            multicast = OPS["rendezvous"](t, group)
        except Exception as e:
            error = e
        failed, no_multicast = agree([int(error is not None), int(not multicast)], "max", group)
        multicast = not no_multicast  # (every rank takes the same form)
    if failed:
        _FAILED.add(name)
        why = f" ({error!r})" if error is not None else " (on another rank)"
        warnings.warn(f"the symmetric-memory all-reduce could not be set up{why}: TP sums stay NCCL's", stacklevel=2)
        return None
    _BUFFERS[name] = Buffer(t, name, multicast, _group_size(group))
    return _BUFFERS[name]


def method(buf: Buffer, nbytes: int) -> str:
    """Which form sums `nbytes`: "one_shot", "multimem" or "two_shot" (torch's two-shot takes 2, 4 or 8 ranks)."""
    if nbytes <= ONE_SHOT_BYTES or not (buf.multicast or buf.size in (2, 4, 8)):
        return "one_shot"
    return "multimem" if buf.multicast else "two_shot"


def all_reduce(x: torch.Tensor, group, how: str | None = None) -> torch.Tensor | None:
    """x summed over the TP group through its symmetric buffer, a new tensor of x's shape; None where this does not
    apply (no buffer prepared for the group, not on a GPU, another dtype than bf16/fp32, larger than the buffer, not
    16-byte aligned): the caller's NCCL all-reduce then, on every rank alike (the same shapes everywhere). `how`
    forces a form (bench/tp_allreduce.py times each); else method() chooses."""
    if not _BUFFERS or group is None:
        return None
    buf = _BUFFERS.get(group.group_name)
    nbytes = x.numel() * x.element_size()
    if buf is None or x.device.type not in DEVICES or x.dtype not in _DTYPES or nbytes == 0 or nbytes > buf.capacity:
        return None
    shape, x = x.shape, x.contiguous()
    # (by the view's offset, not its address: every rank must decide alike, and the allocator's blocks start aligned)
    if nbytes % _ALIGN or x.storage_offset() * x.element_size() % _ALIGN:
        return None
    x = x.view(-1)
    view = buf.tensor[:nbytes].view(x.dtype)
    out = torch.empty_like(x)
    how = how or method(buf, nbytes)
    if how == "one_shot":
        OPS["one_shot"](view, x, buf.name, out)  # (the copy into the buffer inside the same kernel)
    else:
        view.copy_(x)
        OPS[how](view, buf.name, out)
    return out.view(shape)


def describe(group) -> str:
    """How the group's TP sums run, for a bench's header: the process group's backend's ("nccl"), or the symmetric
    buffer's forms and sizes."""
    buf = None if group is None else _BUFFERS.get(group.group_name)
    if buf is None:
        failed = group is not None and group.group_name in _FAILED
        backend = "none (one rank)" if _group_size(group) == 1 else dist.get_backend(group)
        return backend + (" (the symmetric-memory buffer could not be made)" if failed else "")
    above = "the switch's multicast" if buf.multicast else "two-shot"
    return (f"symmetric memory up to {buf.capacity} bytes (one-shot up to {ONE_SHOT_BYTES}, then {above}), "
            "NCCL above")  # fmt: skip


def release() -> None:
    """Forget every group's buffer (tests; a process that destroys its process groups)."""
    _BUFFERS.clear()
    _FAILED.clear()
