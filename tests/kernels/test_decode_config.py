"""kernels/decode_config.py: the decode kernel's default tiles at every row width, and the split count."""

import itertools

from kernels import decode_config as dc
from kernels.decode_config import choose_num_splits


def test_decode_config_tiles_fit_every_row_width():
    """The default launch at every head dim, cache element size and group: a power-of-two tile of 16 to 128 tokens
    (tl.dot's K dimension is at least 16), through tl.dot (padded to 16 query rows) for MHA as for GQA."""
    for block_d, elem, group in itertools.product((64, 128, 256), (1, 2, 4), (1, 2, 8)):
        cfg = dc.decode_config(group, block_d, elem)
        assert 16 <= cfg["block_n"] <= 128 and cfg["block_n"] & (cfg["block_n"] - 1) == 0, (block_d, elem, group, cfg)
        assert group >= cfg["dot_min_group"], cfg
    assert dc.decode_config(1, 128, 2)["block_n"] == 2 * dc.decode_config(8, 128, 2)["block_n"]  # (as measured)
    assert dc.decode_config(1, 128, 1)["block_n"] == 2 * dc.decode_config(1, 128, 2)["block_n"]  # fp8: same bytes


def test_choose_num_splits():
    h100 = 132
    assert choose_num_splits(64, 40, 384, 64, h100) == 1  # plenty of programs already
    assert choose_num_splits(8, 40, 4096, 64, h100) == 2  # 320 programs: two waves' worth more
    assert choose_num_splits(1, 40, 4096, 64, h100) == 14  # one sequence, long context: split it
    assert choose_num_splits(1, 1, 100, 64, h100) == 1  # short context: never below 256 tokens a split
    assert choose_num_splits(1, 1, 10**7, 64, h100) == 64  # capped
    # the decode config's min_split_tokens: batch 1 at a 384-token table (the rollout bench's), 2 splits or 1
    assert choose_num_splits(1, 40, 384, 64, h100) == 2 and choose_num_splits(1, 40, 384, 64, h100, 512) == 1
