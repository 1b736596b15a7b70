"""kernels.sampling.gumbel_sample (one pass per row) against kernels/reference.py, in the interpreter."""

import contextlib

import pytest
import torch
import triton
import triton.language as tl

from kernels import dispatch, reference, sampling
from kernels.sampling import _uniform, combine_partial_samples, gumbel_sample, gumbel_sample_partial


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,v", [(1, 5), (37, 1000), (6, 4099)])  # 4099: several blocks, the last one ragged
def test_same_tokens_and_logprobs_as_the_reference(temperature, dtype, b, v):
    """The same noise bits (a 32-bit hash of seed, counter and column), the same argmax (first on ties), the
    log-prob under the raw logits."""
    logits = (3 * torch.randn(b, v)).to(dtype)
    seeds = torch.randint(0, 2**32, (b,), dtype=torch.int64)
    counters = torch.randint(0, 5000, (b,), dtype=torch.int64)
    tokens, logprobs = gumbel_sample(logits, seeds, counters, temperature)
    want_tokens, want_logprobs = reference.gumbel_sample(logits, seeds, counters, temperature)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, want_tokens)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float32, -1e4), (torch.bfloat16, 3e4)])
def test_the_logprob_of_large_logits_is_not_rounded_at_their_magnitude(temperature, dtype, scale):
    """Logits of 1e4 (3e4 in bf16) a few apart: the drawn token's log-prob against float64, on both paths. Taken as
    logit - (max + log s), it rounded at ulp(max) (1e-3 at 1e4); (logit - max) - log s keeps what the offsets give."""
    b = 64
    offsets = torch.tensor([0.0, -0.5, -3.0, -5.0, -8.0, -2.0] * 2)
    logits = (scale + offsets).to(dtype).expand(b, -1).contiguous()
    seeds, counters = torch.arange(b, dtype=torch.int64) * 7919 + 1, torch.zeros(b, dtype=torch.int64)
    exact_all = torch.log_softmax(logits.double(), -1)
    for fn in (gumbel_sample, reference.gumbel_sample):
        tokens, logprobs = fn(logits, seeds, counters, temperature)
        if temperature:
            assert tokens.unique().numel() > 3, fn  # (several tokens drawn, not the largest alone)
        exact = exact_all.gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs.double(), exact, atol=1e-5, rtol=1e-5, msg=lambda m, fn=fn: f"{fn}: {m}")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.bfloat16, 3e4)])
def test_vocabulary_shards_of_large_logits_combine_into_the_exact_logprob(temperature, dtype, scale):
    """The tensor-parallel draw of the test above: each shard's logsumexp of logits of 1e4 (3e4 in bf16), held in
    fp32, rounded at ulp(1e4) (5e-4 off in the combined log-prob); in float64 the combined log-prob is float64's,
    on the kernel and the reference path."""
    b, shards = 64, 3
    offsets = torch.tensor([0.0, -0.5, -3.0, -5.0, -8.0, -2.0] * 3)
    logits = (scale + offsets).to(dtype).expand(b, -1).contiguous()
    width = logits.shape[1] // shards
    seeds, counters = torch.arange(b, dtype=torch.int64) * 7919 + 1, torch.zeros(b, dtype=torch.int64)
    exact_all = torch.log_softmax(logits.double(), -1)
    for fn in (gumbel_sample_partial, reference.gumbel_sample_partial):
        parts = [fn(logits[:, i * width : (i + 1) * width], seeds, counters, temperature, i * width) for i in range(3)]
        tokens, logprobs = combine_partial_samples(
            torch.stack([t for t, _ in parts]), torch.stack([s for _, s in parts])
        )  # fmt: skip
        assert torch.equal(tokens, gumbel_sample(logits, seeds, counters, temperature)[0]), fn
        exact = exact_all.gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs.double(), exact, atol=1e-5, rtol=1e-5, msg=lambda m, fn=fn: f"{fn}: {m}")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_sampler_exchanges_the_shards_stats_in_float64(monkeypatch, temperature):
    """engine.sampler.sample_tokens under tensor parallelism (ranks stood in for one at a time, the all-gather by the
    ranks' own exchanged rows): what each rank sends keeps its shard's logsumexp in float64, so the combined log-prob of
    logits of 1e4 is float64's on every rank (sent in fp32 it rounded at ulp(1e4), 5e-4 off)."""
    import engine.sampler as sampler
    from engine.config import GenerateConfig

    b, shards = 64, 2
    offsets = torch.tensor([0.0, -0.5, -3.0, -5.0, -8.0, -2.0] * 2)
    logits = (1e4 + offsets).expand(b, -1).contiguous()
    width = logits.shape[1] // shards
    seeds, counters = torch.arange(b, dtype=torch.int64) * 7919 + 1, torch.zeros(b, dtype=torch.int64)
    params = GenerateConfig(temperature=temperature, top_p=1.0)
    sent = {}
    monkeypatch.setattr(sampler, "group_size", lambda group: shards)

    def draw(rank):
        return sampler.sample_tokens(logits[:, rank * width : (rank + 1) * width], params, seeds, counters,
                                     group=rank, vocab_offset=rank * width)  # fmt: skip

    def record(x, dim, group):  # (a first pass: what each rank sends)
        sent[group] = x.clone()
        return torch.cat([x] * shards, dim)

    monkeypatch.setattr(sampler, "gather_dim", record)
    for rank in range(shards):
        draw(rank)
    monkeypatch.setattr(sampler, "gather_dim", lambda x, dim, group: torch.cat([sent[r] for r in range(shards)], dim))
    want_tokens = gumbel_sample(logits, seeds, counters, temperature)[0]
    exact = torch.log_softmax(logits.double(), -1).gather(-1, want_tokens[:, None]).squeeze(-1)
    for rank in range(shards):
        tokens, logprobs = draw(rank)
        assert torch.equal(tokens, want_tokens), rank
        torch.testing.assert_close(logprobs.double(), exact, atol=1e-5, rtol=1e-5)


def test_greedy_ties_take_the_first_and_strided_rows():
    """An exact tie across blocks resolves to the lower index (torch.argmax); rows of a wider tensor."""
    wide = torch.zeros(3, 5000)
    wide[:, 10] = 2.0
    wide[:, 4000] = 2.0  # same value, a later block
    logits = wide[:, :4500]
    tokens, _ = gumbel_sample(logits, torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 0.0)
    assert tokens.tolist() == [10, 10, 10]


def test_reference_path_and_errors():
    logits = torch.randn(4, 50)
    seeds, counters = torch.arange(4), torch.arange(4)
    with dispatch.reference_ops():
        got = gumbel_sample(logits, seeds, counters, 0.7)
    assert torch.equal(got[0], gumbel_sample(logits, seeds, counters, 0.7)[0])
    with pytest.raises(ValueError, match="logits must be"):
        gumbel_sample(logits[0], seeds, counters, 0.7)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_sample(logits, seeds, counters, -1.0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("shards", [2, 3])
def test_vocabulary_shards_combine_into_the_whole_rows_sample(temperature, shards):
    """Each tensor-parallel rank samples its shard (noise keyed by global ids); combining the shards' (token, best
    score, logit, logsumexp) gives the whole row's token and log-prob, on the kernel and the reference path."""
    b, v = 9, 3 * 1500  # shards of 1500 or 2250 columns: several kernel blocks, the last ragged
    logits = (3 * torch.randn(b, v)).to(torch.bfloat16)
    logits[0, 100] = logits[0, 2300] = logits[0].float().max() + 5  # a greedy tie across shards: the first wins
    seeds = torch.randint(0, 2**32, (b,), dtype=torch.int64)
    counters = torch.randint(0, 5000, (b,), dtype=torch.int64)
    want_tokens, want_logprobs = gumbel_sample(logits, seeds, counters, temperature)
    width = v // shards
    parts = [
        gumbel_sample_partial(logits[:, i * width : (i + 1) * width], seeds, counters, temperature, i * width)
        for i in range(shards)
    ]
    for i, (tok, stats) in enumerate(parts):
        ref_tok, ref_stats = reference.gumbel_sample_partial(
            logits[:, i * width : (i + 1) * width], seeds, counters, temperature, i * width
        )
        assert torch.equal(tok, ref_tok) and stats.shape == (b, 3)
        torch.testing.assert_close(stats, ref_stats, atol=1e-5, rtol=1e-5)
    tokens, logprobs = combine_partial_samples(torch.stack([t for t, _ in parts]), torch.stack([s for _, s in parts]))
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-5, rtol=1e-5)
    if temperature == 0:
        assert tokens[0] == 100


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_logit_floor_restricts_the_draw_and_keeps_the_whole_rows_logprob(temperature, dtype):
    """min_logit (top-k's k-th largest logit): kernel and reference draw the same token, always one at or above its
    row's floor (ties at it included), the log-prob under the whole row; over vocabulary shards too, including a
    shard with no logit above the floor."""
    b, v, k = 40, 3000, 7
    logits = (3 * torch.randn(b, v)).to(dtype)
    logits[2, 1500:] = -30.0  # the second shard holds nothing above the floor
    floor = torch.topk(logits.float(), k, dim=-1).values[:, -1]
    seeds = torch.randint(0, 2**32, (b,), dtype=torch.int64)
    counters = torch.randint(0, 5000, (b,), dtype=torch.int64)
    tokens, logprobs = gumbel_sample(logits, seeds, counters, temperature, floor)
    want_tokens, want_logprobs = reference.gumbel_sample(logits, seeds, counters, temperature, floor)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-5, rtol=1e-5)
    assert (logits.float().gather(-1, tokens[:, None]).squeeze(-1) >= floor).all()
    exact = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), exact, atol=1e-5, rtol=1e-5)
    if temperature:  # the floor changes draws (without it, most rows take a token outside their top 7)
        free, _ = gumbel_sample(logits, seeds, counters, temperature)
        assert (logits.float().gather(-1, free[:, None]).squeeze(-1) < floor).any()
    parts = [gumbel_sample_partial(logits[:, i : i + 1500], seeds, counters, temperature, i, floor) for i in (0, 1500)]
    for i, (tok, stats) in zip((0, 1500), parts):
        ref_tok, ref_stats = reference.gumbel_sample_partial(logits[:, i : i + 1500], seeds, counters, temperature,
                                                             i, floor)  # fmt: skip
        assert torch.equal(tok, ref_tok)
        drawn = stats[:, 0] > -float("inf")  # (a shard with nothing to draw: its 'logit' is never read)
        torch.testing.assert_close(stats[:, 0::2], ref_stats[:, 0::2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats[drawn, 1], ref_stats[drawn, 1], atol=1e-5, rtol=1e-5)
    if temperature:
        assert parts[1][1][2, 0] == -float("inf")
    tokens2, logprobs2 = combine_partial_samples(torch.stack([t for t, _ in parts]), torch.stack([s for _, s in parts]))
    assert torch.equal(tokens2, tokens)
    torch.testing.assert_close(logprobs2, logprobs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"min_logit must be \[B\] = \[40\]"):
        gumbel_sample(logits, seeds, counters, temperature, floor[:3])


def test_every_logit_tied_at_the_floor_may_be_drawn():
    """Nine equal largest logits and k = 7: the floor is their value and all nine are drawn (transformers' PyTorch
    TopKLogitsWarper keeps ties at the k-th logit too), none below them, in the kernel and the reference."""
    n, v = 400, 3000
    logits = torch.randn(1, v).expand(n, v).clone()
    logits[:, 2000:2009] = 10.0  # (across the kernel's blocks of 1024)
    floor = torch.topk(logits, 7, dim=-1).values[:, -1]
    assert (floor == 10.0).all()
    seeds, counters = torch.full((n,), 5, dtype=torch.int64), torch.arange(n, dtype=torch.int64)
    for fn in (gumbel_sample, reference.gumbel_sample):
        tokens, _ = fn(logits, seeds, counters, 1.0, floor)
        assert set(tokens.tolist()) == set(range(2000, 2009)), fn


@triton.jit
def _uniform_of(BITS, OUT, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, _uniform(tl.load(BITS + offs)))


def test_every_noise_code_is_strictly_inside_0_1():
    """Each of the 2^23 codes a hash can give (its top 23 bits; the low 9 set: the largest hashes) is a distinct
    uniform strictly below 1, in the kernel and in the reference alike: a 1.0 is Gumbel noise of +inf, which would
    make its token win whatever its probability (24 bits rounded the largest code to 1.0)."""
    bits = (torch.arange(1 << 23, dtype=torch.int64) << 9) | 511
    want = reference.bits_to_uniform(bits)
    assert want.max() < 1 and want.min() > 0 and torch.unique(want).numel() == 1 << 23
    got = torch.empty(1 << 23, dtype=torch.float32)
    block = 1 << 16
    _uniform_of[((1 << 23) // block,)](bits.to(torch.int32).view(torch.uint32), got, BLOCK=block)
    assert torch.equal(got, want)


def test_a_certain_token_is_always_drawn():
    """One token at logit 40 against 2^17 at 0 (probability 1 - 4e-13), 400 draws at temperature 0.7: never another
    token. Noise that could reach 1.0 drew a random one in 1 row of 128 (2^17 entries at 2^-24 each); that no code
    gives 1.0 the test above shows for every code, this one end to end through the reference's scores."""
    v, rows = 1 << 17, 400
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 12345
    counters = torch.arange(rows, dtype=torch.int64) % 300
    for chunk in range(0, rows, 200):
        s, c = seeds[chunk : chunk + 200], counters[chunk : chunk + 200]
        logits = torch.zeros(len(s), v)
        logits[:, 123] = 40.0
        tokens, _ = reference.gumbel_sample(logits, s, c, 0.7)
        assert (tokens == 123).all(), tokens[tokens != 123]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_rows_that_open_with_a_block_of_masked_logits(temperature):
    """A row whose first vocabulary block is all -inf (a banned range, a shard with nothing allowed): the same token
    and a finite log-prob (the running log-sum-exp started as exp(-inf - -inf), NaN)."""
    from kernels import sampling

    b, v = 3, 2 * sampling._BLOCK_V + 100
    logits = torch.randn(b, v)
    logits[0, : sampling._BLOCK_V] = -float("inf")
    logits[2, : 2 * sampling._BLOCK_V] = -float("inf")
    seeds, counters = torch.arange(b) + 11, torch.zeros(b, dtype=torch.int64)
    tokens, logprobs = gumbel_sample(logits, seeds, counters, temperature)
    want_tokens, want = reference.gumbel_sample(logits.double(), seeds, counters, temperature)
    assert torch.equal(tokens, want_tokens) and torch.isfinite(logprobs).all()
    torch.testing.assert_close(logprobs.double(), want.double(), atol=1e-5, rtol=1e-5)
    stats = gumbel_sample_partial(logits, seeds, counters, temperature, 0)[1]
    assert torch.isfinite(stats[:, 2]).all()


def test_sampler_inputs_are_checked():
    logits, seeds, counters = torch.randn(2, 10), torch.arange(2), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature must be >= 0 and finite, got nan"):
        gumbel_sample(logits, seeds, counters, float("nan"))
    with pytest.raises(ValueError, match="empty vocabulary"):
        gumbel_sample(torch.randn(2, 0), seeds, counters, 1.0)
    with pytest.raises(ValueError, match="must be integer tensors"):
        gumbel_sample(logits, seeds.float(), counters, 1.0)


def test_int32_seeds_and_a_floor_above_every_logit():
    """Seeds and counters as int32 (negative ones too) draw what their int64 values draw, on both paths (the
    reference's hash wrapped int32 products: other noise); a floor above every logit leaves nothing drawable, and
    both paths return token 0 with its own log-prob (the kernel paired token 0 with a logit of 0)."""
    b, v = 6, 300
    logits = 2 * torch.randn(b, v)
    seeds = torch.tensor([5, -1, 123456789, 7, -(2**31), 2**31 - 1], dtype=torch.int64)
    counters = torch.tensor([3, 2, 1000, -4, 0, 77], dtype=torch.int64)
    want = reference.gumbel_sample(logits, seeds, counters, 0.8)
    for s, c in ((seeds.int(), counters.int()), (seeds, counters.int())):
        for got in (gumbel_sample(logits, s, c, 0.8), reference.gumbel_sample(logits, s, c, 0.8)):
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    floor = logits.max(-1).values + 1.0
    exact = torch.log_softmax(logits.double(), -1)[:, 0].float()
    for got in (gumbel_sample(logits, seeds, counters, 0.8, floor), reference.gumbel_sample(logits, seeds, counters,
                                                                                            0.8, floor)):  # fmt: skip
        assert got[0].tolist() == [0] * b
        torch.testing.assert_close(got[1], exact, atol=1e-5, rtol=1e-5)


def test_logits_without_unit_last_stride_and_more_input_checks():
    """A transposed view (last stride != 1) draws what its contiguous copy draws; greedy ignores a floor (as the
    reference does), even one above every logit; bad seeds/counters/temperature are named."""
    b, v = 5, 300
    logits = (2 * torch.randn(v, b)).t()
    assert logits.stride(-1) != 1
    seeds, counters = torch.randint(0, 2**32, (b,), dtype=torch.int64), torch.arange(b)
    for temperature in (0.0, 0.9):
        got = gumbel_sample(logits, seeds, counters, temperature)
        want = gumbel_sample(logits.contiguous(), seeds, counters, temperature)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    floor = logits.max(-1).values + 1.0
    got = gumbel_sample(logits, seeds, counters, 0.0, floor)
    assert torch.equal(got[0], reference.gumbel_sample(logits, seeds, counters, 0.0, floor)[0])
    assert torch.equal(got[0], logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature must be >= 0 and finite, got inf"):
        gumbel_sample(logits, seeds, counters, float("inf"))
    with pytest.raises(ValueError, match="must be integer tensors"):
        gumbel_sample(logits, seeds, counters.float(), 1.0)
    with pytest.raises(ValueError, match="seeds and counters"):
        gumbel_sample(logits, seeds, counters[:3], 1.0)


def test_strided_seeds_and_counters_draw_what_their_values_draw():
    """Seeds and counters as columns of a wider tensor (stride 2; made contiguous for the kernel, which reads them
    with unit stride) draw what contiguous copies of them draw, on both paths."""
    b, v = 7, 300
    logits = 2 * torch.randn(b, v)
    state = torch.stack([torch.randint(0, 2**32, (b,)), torch.arange(b) * 3 + 1], dim=-1)  # [B, 2]: seed, counter
    seeds, counters = state[:, 0], state[:, 1]
    assert seeds.stride(0) == 2 and counters.stride(0) == 2
    want = reference.gumbel_sample(logits, seeds.contiguous(), counters.contiguous(), 0.8)
    for fn in (gumbel_sample, reference.gumbel_sample):
        got = fn(logits, seeds, counters, 0.8)
        assert torch.equal(got[0], want[0]), fn
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    tokens, stats = gumbel_sample_partial(logits, seeds, counters, 0.8, 0)
    assert torch.equal(tokens, want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v,k", [(1000, 1), (3001, 50), (777, 777), (2049, 2048), (5, 3)])
def test_kth_largest_is_topks_last_value(dtype, v, k):
    """kernels.sampling.kth_largest (radix select, top-k's floor) against torch.topk's k-th value, exactly: ties (a row
    whose first logits share one value, a row all one value), -inf runs (a masked or padded vocabulary), negative and
    positive logits, a vocabulary that is no multiple of the tile, and rows strided in a wider buffer."""
    from kernels.sampling import kth_largest

    wide = (torch.randn(5, v + 7) * 4).to(dtype)
    x = wide[:, :v]  # (rows v + 7 apart)
    x[0, : min(v, 40)] = x[0, min(v, 40) - 1]
    x[1] = x[1, 0]
    x[2, v // 3 : v // 2] = float("-inf")
    x[3] = -x[3].abs()
    got = kth_largest(x, k)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert torch.equal(got, torch.topk(x, k, dim=-1).values[:, -1].float())


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp,shard,k", [(2, 500, 50), (4, 256, 1), (3, 101, 303), (2, 1500, 2999), (2, 3000, 100)])
def test_kth_largest_over_vocabulary_shards_is_topks_last_value(dtype, tp, shard, k, path):
    """kernels.sampling.kth_largest_sharded (tensor parallelism's top-k floor: each pass's histograms summed over the
    ranks' shards) and its torch oracle against torch.topk of the whole rows, exactly. The tp ranks are simulated in
    one process: rank r's shard of row b is row r * B + b, and the all-reduce sums the histograms over r in place.
    Ties across shards, a last shard padded with -inf (a vocabulary tp does not divide), one shard all -inf, k = 1
    and k = V."""
    from kernels.sampling import kth_largest_sharded

    b = 5
    rows = (torch.randn(b, tp * shard) * 4).to(dtype)
    rows[0, : 2 * shard] = rows[0, 0]  # (one value in the top k on two ranks at once)
    rows[1, -shard // 3 :] = float("-inf")  # (the padding)
    rows[2, :shard] = float("-inf")  # (rank 0's shard all padding)
    rows[3] = -rows[3].abs()
    shards = rows.view(b, tp, shard).transpose(0, 1).reshape(tp * b, shard)  # [rank r's rows, then r + 1's]
    calls = []

    def all_reduce(hist):  # (in place, as torch.distributed.all_reduce: every rank's copy the sum)
        calls.append(tuple(hist.shape))
        hist.copy_(hist.reshape(tp, b, -1).sum(0).repeat(tp, 1).view_as(hist))

    want = torch.topk(rows, k, dim=-1).values[:, -1].float()
    passes = 2 if dtype == torch.bfloat16 and path == "triton" else 4  # (bf16's low 16 key bits: all alike)
    # (the kernels: each rank's shard rows in 1 part, or split in 2 or 3 as a small batch's are: a pass's histograms
    # [rows, parts, 256], summed over the ranks part by part, then over the parts by the next pass)
    for parts in (None, 2, 3) if path == "triton" else (None,):
        calls.clear()
        with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
            got = kth_largest_sharded(shards, k, all_reduce, **({"parts": parts} if parts else {}))
        n_parts = min(parts or 1, -(-shard // sampling._BLOCK_V))
        shape = (tp * b, n_parts, 256) if path == "triton" else (tp * b, 256)
        assert got.dtype == torch.float32 and calls == [shape] * passes, (parts, calls)
        assert torch.equal(got.view(tp, b), want.repeat(tp, 1))  # (every rank the same floor)


@pytest.mark.parametrize(  # (each dtype and each shape once: the loads upcast whatever the row's length)
    "dtype,b,v", [(torch.bfloat16, 3, 4097), (torch.float16, 1, 5000), (torch.float32, 2, 2049)]
)
def test_rows_in_parts_draw_and_select_as_whole_rows(dtype, b, v):
    """A small batch's rows split into parts (kernels.sampling.row_parts: batch 1 would stream its row on one SM):
    the draw's parts combined by one more launch give the very tokens of whole rows (and of the float64 oracle), the
    log-probs within float rounding, a TP rank's partial (token, stats) likewise; top-k's floor by one launch a pass
    over the parts is exactly torch.topk's, top-p's the sorted float64 floor. Parts of whole blocks, the last one
    short, up to the row's block count; a tie at the top across parts (the first wins), a row whose top k lies in one
    part, -inf runs, greedy, a floor."""
    torch.manual_seed(b * v)
    x = (torch.randn(b, v) * 3).to(dtype)
    x[0, [5, v - 3]] = 40.0  # (a tie of the two largest, in the first and the last part: the first wins)
    x[-1, -700:] = float("-inf")
    seeds, counters = torch.randint(0, 2**40, (b,)), torch.randint(0, 1000, (b,))
    floor = torch.topk(x.float(), 30).values[:, -1]
    blocks = -(-v // sampling._BLOCK_V)
    for temperature, min_logit in ((0.7, None), (0.0, None), (1.3, floor)):
        whole, whole_lp = gumbel_sample(x, seeds, counters, temperature, min_logit, parts=1)
        ref, _ = reference.gumbel_sample(x, seeds, counters, temperature, min_logit)
        assert torch.equal(whole, ref)
        shard_tok, shard_stats = gumbel_sample_partial(x, seeds, counters, temperature, 7000, min_logit, parts=1)
        for parts in range(2, blocks + 2):
            n, per = sampling.row_parts(b, v, x.device, parts)  # (at most the asked, whole blocks, none empty)
            assert n <= min(parts, blocks) and (n - 1) * per < v <= n * per and per % sampling._BLOCK_V == 0
            tok, lp = gumbel_sample(x, seeds, counters, temperature, min_logit, parts=parts)
            assert torch.equal(tok, whole), (parts, tok, whole)
            torch.testing.assert_close(lp, whole_lp, rtol=1e-6, atol=1e-5)
            tok, stats = gumbel_sample_partial(x, seeds, counters, temperature, 7000, min_logit, parts=parts)
            assert torch.equal(tok, shard_tok) and torch.equal(stats[:, :2], shard_stats[:, :2]), parts
            torch.testing.assert_close(stats[:, 2], shard_stats[:, 2], rtol=1e-9, atol=1e-6)
    for k in (1, 50, v):
        want = torch.topk(x.float(), k, dim=-1).values[:, -1]
        for parts in (None, 2, 3, blocks + 1):
            assert torch.equal(sampling.kth_largest(x, k, parts=parts), want), (k, parts)
    # top-p's floor likewise (one launch a pass, the max by torch), against the sorted float64 floor
    for top_p, temperature, low in ((0.9, 0.7, None), (0.3, 1.0, floor)):
        for parts in (None, 2, 3, blocks + 1):
            got = sampling.top_p_floor(x, top_p, temperature, low, parts=parts)
            assert _assert_top_p_floor(got, x, top_p, temperature, low).sum() >= b - 1, (top_p, parts)


def test_row_parts_fill_the_sms_of_a_small_batch(monkeypatch):
    """How many parts a row is split into on a GPU of 132 SMs (blocks of 2048 logits there): batch 1 over 32000
    logits in 16 (its blocks), batch 8 in 16, batch 64 and 66 in 2, 67 or more in 1; never past the row's blocks or
    64, every part non-empty; off a GPU the stand-in count of 4 SMs."""
    monkeypatch.setattr(sampling, "sm_count", lambda device: 132)
    monkeypatch.setattr(sampling, "_BLOCK_V", 2048)
    cuda = torch.device("cuda")
    got = {b: sampling.row_parts(b, 32000, cuda) for b in (1, 8, 16, 64, 66, 67, 200)}
    assert got == {1: (16, 2048), 8: (16, 2048), 16: (8, 4096), 64: (2, 16384), 66: (2, 16384), 67: (1, 32768),
                   200: (1, 32768)}  # fmt: skip
    assert sampling.row_parts(1, 2048 * 100, cuda) == (50, 2048 * 2)  # (at most 64 asked: 100 blocks, 2 a part)
    assert sampling.row_parts(1, 300, cuda) == (1, 2048) and sampling.row_parts(1, 5000, cuda, 3) == (3, 2048)
    for v in range(1, 20000, 997):
        parts, per = sampling.row_parts(1, v, cuda)
        assert per % 2048 == 0 and (parts - 1) * per < v <= parts * per, (v, parts, per)
    monkeypatch.undo()
    assert sampling.row_parts(1, 32000, torch.device("cpu"))[0] == 4


def test_kth_largest_errors_and_the_sampler_floor():
    """Bad k or shapes name the problem; engine.sampler's top-k floor on one rank comes from kth_largest."""
    from engine import sampler
    from kernels.sampling import kth_largest

    with pytest.raises(ValueError, match="k must be 1 to the vocabulary's 10, got 11"):
        kth_largest(torch.randn(2, 10), 11)
    with pytest.raises(ValueError, match="logits \\[B, V\\] with V >= 1"):
        kth_largest(torch.randn(10), 1)
    assert kth_largest(torch.randn(0, 10), 3).shape == (0,)
    logits = torch.randn(4, 300)
    torch.testing.assert_close(sampler.topk_floor(logits, 50), torch.topk(logits, 50).values[:, -1], rtol=0, atol=0)
    assert torch.equal(sampler.topk_floor(logits, 500), logits.min(-1).values)  # (k past the vocabulary: all of it)


def _top_p_gaps(x, floor, top_p, temperature, low=None):
    """For each row of x [B, V] and a floor [B], in float64 and relative to the row's mass: how far the mass at or
    above the floor is past top_p, and how far the mass strictly above it is short of top_p. A right floor has both
    >= 0 (a logit of its row, or -inf for a row without mass); an exact one both > 0."""
    x = x.double()
    w = reference._top_p_mass(x, x.amax(-1, keepdim=True), temperature, low)
    total = w.sum(-1)
    f = floor.double()[:, None]
    at, above = (w * (x >= f)).sum(-1), (w * (x > f)).sum(-1)
    past, short = (at - top_p * total) / total, (top_p * total - above) / total
    in_row = (x == f).any(-1) | ((total == 0) & (floor == float("-inf")))
    no_mass = total == 0
    return torch.where(no_mass, 1.0, past), torch.where(no_mass, 1.0, short), in_row


def _assert_top_p_floor(got, x, top_p, temperature, low=None):
    """got is the floor reference.top_p_floor (float64, sorted) gives, exactly, wherever that floor's margins exceed
    the fp32 sums' rounding (1e-5 of the row's mass); elsewhere a floor within that rounding of right."""
    want = reference.top_p_floor(x, top_p, temperature, low)
    past, short, _ = _top_p_gaps(x, want, top_p, temperature, low)
    clear = (past > 1e-5) & (short > 1e-5)
    assert torch.equal(got[clear], want[clear]), (got, want)
    past, short, in_row = _top_p_gaps(x, got, top_p, temperature, low)
    assert (in_row & (past >= -1e-5) & (short >= -1e-5)).all(), (got, want, past, short)
    return clear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "v,top_p,temperature,top_k", [(1, 0.5, 1.0, 0), (7, 0.3, 0.7, 0), (1000, 0.9, 0.7, 0), (777, 0.05, 1.3, 50),
                                  (600, 1.0, 0.7, 0), (1100, 0.95, 1.0, 300)],
)  # fmt: skip
def test_top_p_floor_is_where_the_sorted_mass_reaches_top_p(dtype, v, top_p, temperature, top_k):
    """kernels.sampling.top_p_floor (a radix select by mass, fp32 sums) against the float64 sorted oracle: rows with
    their top logits tied (the floor inside the tie: kept whole), a row all one value, a -inf run (a masked
    vocabulary), negative logits, a row with no mass (every logit -inf: -inf), one logit holding nearly all the mass,
    logits near 100, rows strided in a wider buffer, several blocks and a ragged last one; with top-k's floor (only
    the logits >= it count), top_p 1 (every logit but a tail below the fp32 sums' rounding)."""
    from kernels.sampling import top_p_floor

    wide = (torch.randn(7, v + 5) * 3).to(dtype)
    x = wide[:, :v]  # (rows v + 5 apart)
    x[0, : min(v, 40)] = x[0].max()
    x[1] = x[1, 0]
    x[2, v // 3 : v // 2] = float("-inf")
    x[3] = -x[3].abs()
    x[4] = float("-inf")
    x[5, v // 2] = 40.0
    x[6] += 100.0  # (exp(x / T) past fp32's range: the masses are taken from the row's max)
    low = torch.topk(x.float(), min(top_k, v), dim=-1).values[:, -1] if top_k else None
    got = top_p_floor(x, top_p, temperature, low)
    assert got.dtype == torch.float32 and got.shape == (7,)
    clear = _assert_top_p_floor(got, x, top_p, temperature, low)
    assert clear.sum() >= (5 if top_p < 1 else 1)  # (the exact comparison bites on most rows; at top_p 1 no margin)
    assert got[4] == float("-inf") and got[1] == x[1, 0].float()


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tp,shard,top_p,top_k", [(2, 300, 0.9, 0), (4, 100, 0.5, 7), (3, 170, 0.99, 0), (2, 1100, 0.8, 40)]
)
def test_top_p_floor_over_vocabulary_shards_is_the_whole_rows(dtype, tp, shard, top_p, top_k, path):
    """kernels.sampling.top_p_floor_sharded (tensor parallelism's top-p floor: the rows' max and each pass's masses
    summed over the ranks' shards) and its float64 torch oracle against the whole rows' sorted floor. The ranks are
    simulated in one process (rank r's shard of row b is row r * B + b; the all-reduces sum or max over r in place).
    A tie across shards at the top, a last shard padded with -inf, one shard all -inf, top-k's floor."""
    from kernels.sampling import top_p_floor_sharded

    b = 5
    rows = (torch.randn(b, tp * shard) * 3).to(dtype)
    rows[0, : 2 * shard] = rows[0].max()  # (one value holding the top of the mass on two ranks)
    rows[1, -shard // 3 :] = float("-inf")  # (the padding)
    rows[2, :shard] = float("-inf")  # (rank 0's shard all padding)
    rows[3] = -rows[3].abs()
    shards = rows.view(b, tp, shard).transpose(0, 1).reshape(tp * b, shard)  # [rank r's rows, then r + 1's]
    low = torch.topk(rows.float(), top_k, dim=-1).values[:, -1] if top_k else None
    calls = []

    def summed(hist):  # (in place, as torch.distributed.all_reduce: every rank's copy the sum)
        calls.append(("sum", tuple(hist.shape)))
        hist.copy_(hist.reshape(tp, b, -1).sum(0).repeat(tp, 1).view_as(hist))

    def maxed(m):
        calls.append(("max", tuple(m.shape)))
        m.copy_(m.view(tp, b).amax(0).repeat(tp))

    passes = 4 if dtype == torch.bfloat16 and path == "triton" else 8  # (bf16's low 16 key bits: all alike)
    # (the kernels: each rank's shard rows in 1 part, or in 2 as a small batch's are: a pass's masses [rows, parts,
    # 16], summed over the ranks part by part, then over the parts by the next pass)
    for parts in (None, 2) if path == "triton" else (None,):
        calls.clear()
        with dispatch.reference_ops() if path == "reference" else contextlib.nullcontext():
            got = top_p_floor_sharded(shards, top_p, 0.7, summed, maxed, None if low is None else low.repeat(tp),
                                      **({"parts": parts} if parts else {}))  # fmt: skip
        n_parts = min(parts or 1, -(-shard // sampling._BLOCK_V))
        shape = (tp * b, n_parts, 16) if path == "triton" else (tp * b, 16)
        assert got.dtype == torch.float32 and calls == [("max", (tp * b,))] + [("sum", shape)] * passes, calls
        got = got.view(tp, b)
        assert torch.equal(got, got[:1].expand(tp, b))  # (every rank the same floor)
        assert _assert_top_p_floor(got[0], rows, top_p, 0.7, low).sum() >= 4


def test_top_p_floor_ties_errors_and_the_sampler_floor():
    """Ties at the floor are kept whole (four equal logits under top_p 0.5: all four, where HF's warper keeps two);
    the token whose mass reaches top_p exactly is the last kept; bad arguments name the problem; an empty batch;
    engine.sampler's top-p draws from the floor's logits only."""
    from engine import sampler
    from engine.config import GenerateConfig
    from kernels.sampling import top_p_floor

    assert top_p_floor(torch.zeros(1, 4), 0.5).item() == 0.0
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])  # (masses exact in fp32: the sums reach 0.5 and 0.75 exactly)
    assert top_p_floor(probs.log(), 0.5).item() == probs.log()[0, 1].item()
    assert top_p_floor(probs.log(), 0.75).item() == probs.log()[0, 3].item()
    assert top_p_floor(torch.randn(0, 10), 0.5).shape == (0,)
    for bad, match in [(dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
                       (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
                       (dict(temperature=0.0), "temperature must be > 0 and finite, got 0.0"),
                       (dict(min_logit=torch.zeros(3)), r"min_logit must be \[B\] = \[2\], got \(3,\)")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            top_p_floor(torch.randn(2, 10), **{"top_p": 0.5, **bad})
    with pytest.raises(ValueError, match=r"logits \[B, V\] with V >= 1"):
        top_p_floor(torch.randn(10), 0.5)
    logits = torch.randn(64, 300) * 2
    floor = sampler.top_p_floor(logits, 0.8, 0.7)
    tokens, logprobs = sampler.sample_tokens(
        logits, GenerateConfig(temperature=0.7, top_p=0.8), torch.arange(64), torch.zeros(64, dtype=torch.int64)
    )
    assert (logits.gather(-1, tokens[:, None]).squeeze(-1) >= floor).all()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    # the kernels and the reference path draw the same tokens (their floors agree on these rows)
    with dispatch.reference_ops():
        ref_tokens, _ = sampler.sample_tokens(
            logits, GenerateConfig(temperature=0.7, top_p=0.8), torch.arange(64), torch.zeros(64, dtype=torch.int64)
        )
    assert torch.equal(tokens, ref_tokens)


def test_the_engine_sampler_at_a_small_batch_splits_rows_and_draws_the_same():
    """engine.sampler.sample_tokens at batch 2 over 5000 logits (the recipe's top-k 50, temperature 0.7, bf16): the
    kernels split each row into parts here (row_parts, 4 stand-in SMs) for top-k's floor and the draw, and draw the
    reference path's tokens, above the k-th largest logit, with the raw log-softmax's log-probs."""
    import engine.sampler as sampler
    from engine.config import GenerateConfig

    torch.manual_seed(3)
    b, v = 2, 5000
    logits = (torch.randn(b, v) * 3).to(torch.bfloat16)
    seeds, counters = torch.tensor([11, 12]), torch.tensor([0, 5])
    params = GenerateConfig(temperature=0.7, top_k=50)
    assert sampling.row_parts(b, v, logits.device)[0] > 1
    tokens, logprobs = sampler.sample_tokens(logits, params, seeds, counters)
    with dispatch.reference_ops():
        ref_tokens, ref_logprobs = sampler.sample_tokens(logits, params, seeds, counters)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    floor = torch.topk(logits.float(), 50).values[:, -1]
    assert (logits.float().gather(-1, tokens[:, None]).squeeze(-1) >= floor).all()
    exact = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_combining_shards_by_kernel_is_the_oracles(shards):
    """kernels.sampling.combine_partial_samples (one launch; the same kernel joins a small batch's row parts) against
    its torch oracle: the first shard holding the best score (ties across shards, a row with every score -inf, the
    best in the last shard), the log-prob in float64 from logits of 1e4 (fp32 would round at ulp); bad shapes named."""
    torch.manual_seed(shards)
    b = 9
    tokens = torch.randint(0, 32000, (shards, b))
    stats = torch.randn(shards, b, 3, dtype=torch.float64) * 3
    stats[..., 1] += 1e4
    stats[..., 2] = stats[..., 1] + torch.rand(shards, b, dtype=torch.float64) * 5
    stats[:, 0, 0] = 2.5  # (a tie in every shard: the first wins)
    stats[:, 1, 0] = float("-inf")  # (nothing drawable anywhere: shard 0's, as argmax)
    stats[-1, 2, 0] = 99.0  # (the best in the last shard)
    got = sampling.combine_partial_samples(tokens, stats)
    want = reference.combine_partial_samples(tokens, stats)
    assert torch.equal(got[0], want[0]) and got[0][2] == tokens[-1, 2] and got[0][0] == tokens[0, 0]
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"tokens \[S, B\] and stats \[S, B, 3\] expected, got \(2, 3\) \(2, 3\)"):
        sampling.combine_partial_samples(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))
