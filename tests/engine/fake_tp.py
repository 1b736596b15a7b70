"""One tensor-parallel rank's shards built in one process: a stand-in TP group and the patch that makes the model's
layers read its size and rank (no collective may be called through it)."""

import engine.model
import engine.parallel


class FakeGroup:
    """A stand-in TP group of `size` ranks, seen from `rank`."""

    def __init__(self, size: int, rank: int = 0):
        self.size, self.rank = size, rank


def fake_tp(monkeypatch) -> None:
    """Make engine.parallel and engine.model read a FakeGroup's size and rank (None stays one rank)."""
    for mod in (engine.parallel, engine.model):
        monkeypatch.setattr(mod, "group_size", lambda g: 1 if g is None else g.size, raising=False)
        monkeypatch.setattr(mod, "group_rank", lambda g: 0 if g is None else g.rank, raising=False)
