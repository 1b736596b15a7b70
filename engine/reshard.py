"""A saved optimizer re-laid for another layout: another tensor-parallel degree, another number of data-parallel
ranks, or the other --distributed-optimizer setting (engine/optim.py's two layouts).

It goes parameter by parameter through the saved ranks' memory-mapped state files: a parameter's saved pieces
(its TP slices, each perhaps cut across the DP ranks' flat shards) are read, joined into the whole parameter when
the TP degree changed, and this rank's part of it is cut out; only the parameters that reach this rank's shards
are read at all. Host memory stays near this rank's own optimizer state plus one whole parameter (fp32 master and
two moments), rather than every saved rank's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.parallel import shard_range, shard_rows, take_shard

if TYPE_CHECKING:
    from engine.optim import Optimizer


@dataclass
class SavedOptimizer:
    """One optimizer as a checkpoint saved it: every saved global rank's optimizer_state() (None where its file is
    not needed and was not read), in global-rank order (rank = dp_rank * tp + tp_rank), and the saved grid."""

    states: list[dict | None]
    tp: int
    dp: int

    def rank_state(self, dp_rank: int, tp_rank: int) -> dict:
        st = self.states[dp_rank * self.tp + tp_rank]
        if st is None:
            raise ValueError(f"re-laying the optimizer needs the state of saved rank {dp_rank * self.tp + tp_rank}")
        return st

    @property
    def distributed(self) -> bool:
        return self.rank_state(0, 0)["distributed"]


def needed_ranks(tp: int, dp: int, distributed: bool) -> list[int]:
    """The saved global ranks whose state files a re-layout reads: all of them when the optimizer was sharded over
    the DP ranks; else DP rank 0's of each TP rank (every DP rank saved the same)."""
    return list(range(tp * dp)) if distributed else list(range(tp))


def _local_shape(shape: torch.Size, split, tp_now: int, tp: int) -> tuple[int, ...]:
    """A parameter's shape on a rank of TP degree `tp`, from its shape at degree `tp_now`."""
    if split is None:
        return tuple(shape)
    dim, sizes = split
    out = list(shape)
    out[dim] = sum(shard_rows(n, tp) for n in sizes)  # (a padded vocabulary's rows: more than 1/tp of them)
    return tuple(out)


class _SavedParameters:
    """The saved (master, exp_avg, exp_avg_sq) of each parameter on one saved TP rank, read on demand."""

    KEYS = ("master", "exp_avg", "exp_avg_sq")

    def __init__(self, opt: Optimizer, saved: SavedOptimizer, tp_rank: int, tp_now: int):
        self.saved, self.tp_rank = saved, tp_rank
        self.shapes = [_local_shape(p.shape, s, tp_now, saved.tp) for p, s in zip(opt.params, opt.splits)]
        head = saved.rank_state(0, tp_rank)
        self.where: dict[int, tuple[int, int]] = {}  # distributed: param -> (bucket, offset in its flat buffer)
        self.bucket_numel: list[int] = []
        if saved.distributed:
            if head.get("buckets") is None:
                raise ValueError("this checkpoint's sharded optimizer predates re-sharding: resume with its layout")
            for k, idx in enumerate(head["buckets"]):
                offset = 0
                for i in idx:
                    self.where[i] = (k, offset)
                    offset += _numel(self.shapes[i])
                self.bucket_numel.append(-(-offset // saved.dp) * saved.dp)
        else:  # the saved masters are those of the parameters that were not fp32 in the checkpoint's run, in order
            mixed = [i for i, p in enumerate(opt.params) if p.dtype != torch.float32]
            saved_masters = len(head["masters"])
            if saved_masters != len(mixed):  # a run of another dtype: a bf16 run's masters of all, an fp32 run's none
                mixed = _saved_mixed(saved_masters, len(opt.params))
            self.master_index = {i: n for n, i in enumerate(mixed)}

    def get(self, i: int) -> list[torch.Tensor | None]:
        """[master (None for an fp32 parameter of an unsharded optimizer: the parameter is its own master),
        exp_avg, exp_avg_sq] of parameter i as this TP rank saved them, fp32, of its saved shape."""
        shape, sv = self.shapes[i], self.saved
        if not sv.distributed:
            st = sv.rank_state(0, self.tp_rank)
            m = st["masters"][self.master_index[i]] if i in self.master_index else None
            a = st["adam"]["state"][i]
            return [m, a["exp_avg"].view(shape), a["exp_avg_sq"].view(shape)]
        k, start = self.where[i]
        stop, shard = start + _numel(shape), self.bucket_numel[k] // sv.dp
        out = []
        for key in self.KEYS:
            pieces = []
            for d in range(start // shard, (stop - 1) // shard + 1):  # the DP ranks whose shards it crosses
                st = sv.rank_state(d, self.tp_rank)
                flat = st["masters"][k] if key == "master" else st["adam"]["state"][k][key]
                lo = d * shard
                pieces.append(flat[max(start, lo) - lo : min(stop, lo + shard) - lo])
            out.append(torch.cat(pieces).view(shape))
        return out


def _saved_mixed(saved_masters: int, params: int) -> list[int]:
    """The parameters whose fp32 masters a checkpoint of another dtype's run holds (saved_masters of them): every
    one (a bf16 or fp16 run's) or none (an fp32 run's, each parameter its own master)."""
    if saved_masters not in (0, params):
        raise ValueError(
            f"the checkpoint's optimizer holds fp32 masters of {saved_masters} of the {params} parameters: "
            "resume with the dtype of the run that saved it"
        )
    return list(range(saved_masters))


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def _reslice(pieces: list[torch.Tensor], split, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice at degree `tp` of a parameter given as its slices of every saved TP rank: each part
    joined from the saved slices, then cut anew (parts as the layer lays them out: tp_split; a vocabulary padded
    at either degree loses its old padding, its new padding zero)."""
    dim, sizes = split
    old_tp = len(pieces)
    out, offset = [], 0
    for size in sizes:
        old = shard_rows(size, old_tp)
        whole = torch.cat([p.narrow(dim, offset, old) for p in pieces], dim).narrow(dim, 0, size)
        out.append(take_shard(whole, dim, *shard_range(size, tp, tp_rank)))
        offset += old
    return torch.cat(out, dim) if len(out) > 1 else out[0]


def relayout(opt: Optimizer, saved: SavedOptimizer, tp: int, tp_rank: int) -> tuple[list[torch.Tensor], dict]:
    """(masters, Adam state dict) in `opt`'s layout (this rank: TP rank `tp_rank` of `tp`, its DP shards when
    `opt.buckets`), from the saved optimizer of any layout."""
    n = len(opt.params)
    same_tp = saved.tp == tp
    readers = {}
    own: set[int] = set()  # the parameters whose master the checkpoint holds

    def reader(t: int) -> _SavedParameters:
        if t not in readers:
            readers[t] = _SavedParameters(opt, saved, t, tp)
        return readers[t]

    def mine(i: int) -> list[torch.Tensor]:
        """Parameter i's (master, exp_avg, exp_avg_sq) on this rank, of its shape here."""
        p, split = opt.params[i], opt.splits[i]
        if same_tp or split is None:  # a replicated parameter: every saved TP rank holds it whole
            got = reader(tp_rank if same_tp else 0).get(i)
        else:
            per_rank = [reader(t).get(i) for t in range(saved.tp)]
            got = [
                None if per_rank[0][j] is None else _reslice([r[j] for r in per_rank], split, tp, tp_rank)
                for j in range(3)
            ]
        if got[0] is None:  # an fp32 parameter, its own master: it was loaded from the checkpoint's weights
            got[0] = p.detach().float().cpu()
        else:
            own.add(i)
        return [t.reshape(p.shape).float() for t in got]

    head = saved.rank_state(0, 0)
    step = next(iter(head["adam"]["state"].values()))["step"]
    if opt.buckets is not None:
        dp = opt.buckets[0].numel // opt.masters[0].numel()
        flat = [[torch.zeros(b.numel // dp) for b in opt.buckets] for _ in range(3)]
        for k, b in enumerate(opt.buckets):
            for i, start, stop, first in b.segments:  # only the parameters reaching this rank's shards
                for dst, t in zip(flat, mine(i)):
                    dst[k][start:stop] = t.reshape(-1)[first : first + stop - start]
        masters, m1, m2 = flat
    else:
        whole = [mine(i) for i in range(n)]
        # this run's masters; with every saved parameter's (a bf16 run's) for fp32 parameters, whose own masters they
        # become (load_optimizer_state)
        every = all(i in own for i in range(n))
        masters = [w[0] for w, p in zip(whole, opt.params) if p.dtype != torch.float32 or every]
        m1, m2 = [w[1].clone() for w in whole], [w[2].clone() for w in whole]
    adam = opt.adam.state_dict()  # this optimizer's param_groups (hyperparameters are set every step anyway)
    adam["state"] = {
        k: {"step": step.clone() if torch.is_tensor(step) else step, "exp_avg": a, "exp_avg_sq": b}
        for k, (a, b) in enumerate(zip(m1, m2))
    }
    return masters, adam
