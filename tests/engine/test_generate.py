"""The rollout engine against transformers' generate, and its scheduler under memory pressure."""

import dataclasses
import math
import weakref

import pytest
import torch

from engine.checkpoint import load_pretrained
from engine.config import GenerateConfig, ModelConfig
from engine.generate import Generator
from engine.kv_cache import bytes_per_block
from engine.model import Transformer
from engine.sampler import filter_logits, sample_tokens, seed_for
from kernels.dispatch import reference_ops
from kernels.reference import uniform_noise
from tests.engine.hf_models import save_hf_model


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, prompts, max_new, eos):
    """transformers' generate, one left-padded batch; cut each row after its first EOS."""
    t = max(map(len, prompts))
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.tensor(p)
        mask[i, t - len(p) :] = 1
    out = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=eos
    )[:, t:].tolist()
    cut = []
    for row in out:
        cut.append(row[: row.index(eos) + 1] if eos in row else row)
    return cut


LLAMA31_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)  # fmt: skip


@pytest.mark.parametrize("kv_heads,rope", [(4, None), (2, None), (2, LLAMA31_ROPE)], ids=["mha", "gqa", "llama3_rope"])
def test_greedy_matches_transformers(tmp_path, kv_heads, rope):
    hf = save_hf_model(
        tmp_path, num_key_value_heads=kv_heads, eos_token_id=2, **({"rope_parameters": rope} if rope else {})
    )
    model = load_pretrained(tmp_path)
    prompts = _prompts(301, [5, 12, 1, 8])
    expected = _hf_greedy(hf, prompts, max_new=10, eos=2)
    gen = Generator(model, block_size=4, num_blocks=64, max_model_len=64)
    got = gen.generate(prompts, GenerateConfig(temperature=0.0, max_new_tokens=10))
    assert got == expected
    assert gen.blocks.num_free_blocks == 64


def test_completions_carry_logprobs_and_finish_reasons(tmp_path):
    save_hf_model(tmp_path, eos_token_id=2)
    model = load_pretrained(tmp_path)
    prompts = _prompts(301, [6, 3])
    with reference_ops():
        comps = Generator(model, block_size=4, num_blocks=64).generate_completions(
            prompts, GenerateConfig(temperature=1.0, max_new_tokens=7, seed=3, n=2)
        )
    assert [(c.prompt_index, c.sample_index) for c in comps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for c in comps:
        p = prompts[c.prompt_index]
        assert len(c.tokens) == len(c.logprobs) and 1 <= len(c.tokens) <= 7
        assert c.finish_reason == ("stop" if c.tokens[-1] == 2 else "length")
        # the log-probs are those of the raw logits (temperature 1), as the trainer computes them
        with torch.no_grad():
            logits = model(torch.tensor([p + c.tokens]))[0, len(p) - 1 : -1]
        ref = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=1e-4)


def test_seed_reproduces_whatever_the_batching(tmp_path):
    save_hf_model(tmp_path)
    model = load_pretrained(tmp_path)
    prompts = _prompts(301, [4, 9, 2, 6, 5])
    params = GenerateConfig(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=6, seed=1234, n=2, ignore_eos=True)
    with reference_ops():
        gen = Generator(model, block_size=4, num_blocks=128)
        together = gen.generate(prompts, params)
        again = gen.generate(prompts, params)
        # one prompt at a time, through a smaller engine with other block sizes: the same samples
        small = Generator(model, block_size=8, num_blocks=32, max_num_seqs=2)
        alone = [t for i, p in enumerate(prompts) for t in small.generate([p], params, seed_keys=[i])]
        other_seed = gen.generate(prompts, GenerateConfig(**{**params.__dict__, "seed": 99}))
        # the last three prompts on their own, keyed by their indices in the full list (a DP rank's share)
        share = [c.tokens for c in gen.generate_completions(prompts[2:], params, seed_keys=[2, 3, 4])]
    assert together == again
    assert alone == together
    assert share == together[4:]
    assert other_seed != together
    assert together[0] != together[1]  # the n samples of one prompt differ


def _run_clean(gen, prompts, params, path):
    """(completions, stats) of one generate call on the kernel or the reference path; every block freed."""
    if path == "reference":
        with reference_ops():
            comps = gen.generate_completions(prompts, params)
    else:
        comps = gen.generate_completions(prompts, params)
    gen.blocks.check_invariants()
    assert gen.blocks.num_free_blocks == gen.blocks.num_blocks and gen.blocks.num_sequences == 0
    return comps, gen.stats


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_prompts_admitted_mid_run_ride_along_with_a_decode_step(path):
    """With more prompts than sequence slots, each admission joins the running sequences' decode step (one
    forward): the samples are those of separate prefill forwards, with fewer prompt-only forwards."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=2)
    prompts = _prompts(512, [3, 11, 1, 7, 16, 5], seed=4)
    params = GenerateConfig(temperature=1.0, max_new_tokens=7, stop_token_ids=list(range(3, 40)), seed=5, n=2)
    make = lambda mix: Generator(model, block_size=4, num_blocks=48, max_model_len=40, max_num_seqs=3, mix_prefill=mix)
    (mixed, st_mixed), (separate, st_separate) = (_run_clean(make(mix), prompts, params, path) for mix in (True, False))
    assert [c.tokens for c in mixed] == [c.tokens for c in separate]
    assert len({len(c.tokens) for c in mixed}) > 2  # stop tokens end sequences at different steps
    for a, b in zip(mixed, separate):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    assert st_mixed.mixed_steps > 0 and st_separate.mixed_steps == 0
    # mixed steps replace prompt-only forwards (admissions into an empty engine still need one); the same
    # prompt tokens go through the model either way
    assert st_mixed.prefill_steps < st_separate.prefill_steps
    assert st_mixed.prefill_tokens == st_separate.prefill_tokens


def test_admissions_wait_for_a_few_free_slots():
    """admit_min_seqs: while sequences run, prompts are admitted once the free slots take that many (each step
    carrying prompts runs eagerly on a GPU), fewer such steps for a few more steps in all; the samples are the same."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=2)
    prompts = _prompts(512, [3, 11, 1, 7, 16, 5] * 8, seed=4)
    params = GenerateConfig(temperature=1.0, max_new_tokens=9, stop_token_ids=list(range(3, 60)), seed=5)
    make = lambda k: Generator(model, block_size=4, num_blocks=200, max_model_len=40, max_num_seqs=8, admit_min_seqs=k)
    (each, st_each), (four, st_four) = (_run_clean(make(k), prompts, params, "reference") for k in (1, 4))
    assert make(None).admit_min_seqs == 1 and Generator(model, max_num_seqs=256).admit_min_seqs == 16
    assert [c.tokens for c in four] == [c.tokens for c in each]
    for a, b in zip(four, each):  # (other batches around a sequence: rounding)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    assert st_four.mixed_steps < st_each.mixed_steps and st_four.decode_steps >= st_each.decode_steps
    with pytest.raises(ValueError, match="admit_min_seqs must be >= 1, got 0"):
        make(0)


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_overlapped_decode_steps_sample_the_same(path):
    """Steps launched before the host reads the previous step's tokens (fed on the device): the same samples
    and log-probs; a sequence that hit a stop token mid-run has its one extra token dropped; no block leaks."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=3)
    prompts = _prompts(512, [4, 13, 2, 8], seed=6)
    params = GenerateConfig(temperature=1.0, max_new_tokens=8, stop_token_ids=list(range(3, 60)), seed=7, n=2)
    make = lambda overlap: Generator(model, block_size=4, num_blocks=64, max_model_len=40, overlap=overlap)
    (ahead, st_ahead), (synced, st_synced) = (_run_clean(make(o), prompts, params, path) for o in (True, False))
    assert [c.tokens for c in ahead] == [c.tokens for c in synced]
    assert [c.finish_reason for c in ahead] == [c.finish_reason for c in synced]
    stopped = [c for c in ahead if c.finish_reason == "stop"]
    assert stopped and any(len(c.tokens) < 7 for c in stopped)  # stops well before the last step
    for a, b in zip(ahead, synced):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    assert st_ahead.overlapped_steps > 0 and st_synced.overlapped_steps == 0
    assert st_ahead.generated_tokens == st_synced.generated_tokens


def test_the_fused_decode_step_samples_the_same():
    """The decode config's fuse_rope 1 (rotary, cache write and paged attention in one kernel) through the whole
    generator, mixed steps included (prompts admitted beside decoding ones): the same samples as the two kernels,
    log-probs within float rounding, every block freed."""
    from kernels import paged_attention

    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=3)
    prompts = _prompts(512, [4, 13, 2, 8, 6], seed=8)
    params = GenerateConfig(temperature=1.0, max_new_tokens=7, stop_token_ids=list(range(3, 40)), seed=9, n=2)
    make = lambda: Generator(model, block_size=4, num_blocks=64, max_model_len=40, max_num_seqs=3, mix_prefill=True)
    two, st_two = _run_clean(make(), prompts, params, "kernels")
    try:
        paged_attention.set_decode_config(fuse_rope=1)
        fused, st_fused = _run_clean(make(), prompts, params, "kernels")
    finally:
        paged_attention.set_decode_config()
    assert [c.tokens for c in fused] == [c.tokens for c in two] and st_fused.mixed_steps > 0
    for a, b in zip(fused, two):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)


def test_the_decode_linear_kernel_samples_the_same():
    """The decode config's `linear` 1 through the whole generator: a decode step's layer in five launches of
    kernels/decode_linear.py and the paged attention (QKV with the rotary and the cache write in its epilogue, the
    output and down projections adding themselves to the stream and leaving its row sums, from which the QKV and
    gate_up projections normalise it; SwiGLU in gate_up's epilogue), the LM head too; the first layer's own norm is a
    kernel of its own for steps of more than norm_rows sequences (norm_rows 0: every step; 4: none here, each step has
    at most 4 sequences); prompts' forwards of at most 64 rows through the plain kernel. The same samples as cuBLAS
    and the separate kernels, log-probs within rounding."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=4)
    prompts = _prompts(512, [5, 11, 3], seed=10)
    params = GenerateConfig(temperature=1.0, max_new_tokens=5, seed=11, n=2)
    make = lambda: Generator(model, block_size=4, num_blocks=64, max_model_len=40, max_num_seqs=4)
    cublas, _ = _run_clean(make(), prompts, params, "kernels")
    for norm_rows in (0, 4):  # (against the one run of the plain kernels)
        _decode_linear_samples(model, make, prompts, params, norm_rows, cublas)


def _decode_linear_samples(model, make, prompts, params, norm_rows: int, cublas) -> None:
    """One run with the decode config's `linear` 1 and norm_rows: its launches counted, its samples `cublas`'s."""
    from kernels import decode_linear, paged_attention

    launches = []
    real = decode_linear._launch

    def counted(*a, **kw):
        kind = next((k for k in ("rope", "swiglu", "residual") if kw.get(k)), "plain").replace("residual", "resid")
        launches.append(kind + ("+norm" if kw.get("norm") else ""))
        return real(*a, **kw)

    try:
        paged_attention.set_decode_config(linear=1, norm_rows=norm_rows)
        decode_linear._launch = counted
        ours, _ = _run_clean(make(), prompts, params, "kernels")
    finally:
        decode_linear._launch = real
        paged_attention.set_decode_config()
    layers = model.config.num_layers
    steps = launches.count("resid") // (2 * layers)  # the decode steps
    assert steps >= 4 and launches.count("resid") == 2 * layers * steps, launches
    assert launches.count("swiglu+norm") == layers * steps, launches
    assert launches.count("rope") + launches.count("rope+norm") == layers * steps, launches
    assert launches.count("rope") == (steps if norm_rows == 0 else 0), launches  # the first layer's norm apart
    assert launches.count("swiglu") >= layers and launches.count("plain") >= steps + 1  # (prefill) LM heads
    assert [c.tokens for c in ours] == [c.tokens for c in cublas]
    for a, b in zip(ours, cublas):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)


def test_preemption_loses_nothing_and_leaks_no_block():
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.05, seed=0)
    prompts = _prompts(512, [(i * 7) % 23 + 1 for i in range(300)], seed=1)  # (some 20 preemptions)
    params = GenerateConfig(temperature=0.0, max_new_tokens=8, ignore_eos=True, n=1)
    with reference_ops():
        # 40 blocks of 4 tokens: far fewer than the running sequences want, so the scheduler must
        # make requests wait and preempt running ones
        gen = Generator(model, block_size=4, num_blocks=40, max_model_len=40, max_num_seqs=64)
        comps = gen.generate_completions(prompts, params)
        roomy = Generator(model, block_size=4, num_blocks=4000, max_model_len=40, max_num_seqs=256)
        expected = roomy.generate(prompts, params)  # (every prompt: which of them were preempted is the scheduler's)
    assert gen.stats.preemptions > 0
    assert len(comps) == 300 and all(len(c.tokens) == 8 and c.finish_reason == "length" for c in comps)
    assert [c.tokens for c in comps] == expected  # preempted and recomputed: same greedy tokens
    gen.blocks.check_invariants()
    assert gen.blocks.num_free_blocks == 40 and gen.blocks.num_sequences == 0


def test_release_and_reallocate(tmp_path):
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=8, num_blocks=300)
    with reference_ops():
        a = gen.generate([[1, 5, 9]], temperature=0.0, max_new_tokens=4)
        pool_tensor = weakref.ref(gen.pool.tensor)
        gen.release()
        assert pool_tensor() is None  # no cached layer view or graph keeps the cache's memory alive
        assert not gen.pool.is_allocated
        b = gen.generate([[1, 5, 9]], temperature=0.0, max_new_tokens=4)
    assert a == b


def test_max_model_len_caps_generation():
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    with reference_ops():
        comps = Generator(model, block_size=4, num_blocks=16, max_model_len=12).generate_completions(
            [[1] * 9], GenerateConfig(temperature=0.0, max_new_tokens=100, ignore_eos=True)
        )
    assert len(comps[0].tokens) == 3 and comps[0].finish_reason == "length"
    # (past the model's positions: refused, not lowered to them and the responses cut short unsaid)
    short = Transformer(dataclasses.replace(ModelConfig.named("tiny"), max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_model_len 64 exceeds the model's max_position_embeddings 8"):
        Generator(short, block_size=4, num_blocks=16, max_model_len=64)
    assert Generator(short, block_size=4, num_blocks=16).max_model_len == 8  # (unset: the model's)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[1] * 12], "prompt 0 has 12 tokens; the limit is 11"),
        ([[1, 2], [3, 512]], "prompt 1 has token id 512 outside the vocabulary"),
        ([[1.5, 2]], "prompt 0 has 1.5 at position 0: token ids are integers"),
        ([[1, 2], [3, True]], "prompt 1 has True at position 1: token ids are integers"),
        ([[1], []], "prompt 1 is empty"),
        ([1, 2, 3], r"prompt 0 is 1, not a list of token ids: prompts is a list of token-id lists"),
        ([[1, 2], None], "prompt 1 is None, not a list of token ids"),
        ([[1, 2], b"hi"], r"prompt 1 is text \(bytes\), not token ids: tokenize it first"),  # (was ids 104, 105)
        ([[1, 2], bytearray(b"hi")], r"prompt 1 is text \(bytearray\), not token ids"),
        (["hi"], r"prompt 0 is text \(str\), not token ids: tokenize it first"),
        ([], "non-empty list"),
    ],
)
def test_bad_prompts(prompts, message):
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=16, max_model_len=12)
    with pytest.raises(ValueError, match=message):
        gen.generate(prompts, max_new_tokens=2)


def test_prompts_as_tensors_arrays_or_tuples():
    """A prompt held as a 1-d integer tensor (a tokenizer's return_tensors="pt" row), a numpy array or a tuple samples
    what the list samples (a tensor was refused: "tensor(1) ... token ids are integers"); a float, bool or 0-d one is
    refused by what it holds (a 0-d one raised TypeError: len() of a 0-d tensor)."""
    import numpy as np

    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=16, max_model_len=12)
    params = GenerateConfig(temperature=1.0, max_new_tokens=3, seed=5, ignore_eos=True)
    with reference_ops():
        want = gen.generate([[1, 2, 3], [4, 5]], params)
        for prompts in [
            [torch.tensor([1, 2, 3]), torch.tensor([4, 5], dtype=torch.int32)],
            [np.array([1, 2, 3]), np.array([4, 5], dtype=np.uint16)],
            ((1, 2, 3), (4, 5)),
            [list(torch.tensor([1, 2, 3])), [np.int64(4), np.uint8(5)]],  # (0-d tensors: "tensor(1) ... integers")
        ]:
            assert gen.generate(prompts, params) == want
    for bad, message in [
        (torch.tensor([1.0, 2.0]), "prompt 1 has 1.0 at position 0: token ids are integers"),
        (torch.tensor([True, False]), "prompt 1 has True at position 0: token ids are integers"),
        (torch.tensor(3), "prompt 1 is 3, not a list of token ids"),
        (np.array(3), "prompt 1 is 3, not a list of token ids"),
        ([torch.tensor(1), torch.tensor(True)], r"prompt 1 has tensor\(True\) at position 1: token ids are integers"),
        ([torch.tensor(1), torch.tensor(2.0)], r"prompt 1 has tensor\(2\.\) at position 1: token ids are integers"),
    ]:
        with pytest.raises(ValueError, match=message):
            gen.generate_completions([[1, 2], bad], params)
    assert gen.blocks.num_free_blocks == 16


def test_stop_ids_outside_the_vocabulary_are_refused():
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=16, max_model_len=12)
    for bad in (512, -1):
        with pytest.raises(ValueError, match=rf"stop token id {bad} is outside the vocabulary \[0, 512\)"):
            gen.generate([[1, 2]], max_new_tokens=2, stop_token_ids=[5, bad])
    assert gen.pool is None  # (refused before the KV cache is allocated)


def test_seed_keys_must_be_integers():
    """A key of another kind (a float, None, a bool, a float or 1-d tensor) is refused by name before anything runs
    (it failed inside the seed hash); an int, a numpy int or a 0-d integer tensor keys the same stream."""
    import numpy as np

    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=16, max_model_len=12)
    params = GenerateConfig(temperature=1.0, max_new_tokens=3, seed=5, ignore_eos=True)
    for bad in (1.5, None, True, torch.tensor(1.0), torch.tensor([1])):
        with pytest.raises(ValueError, match=r"seed_keys\[1\] is .*, not an integer"):
            gen.generate_completions([[1, 2], [3, 4]], params, seed_keys=[0, bad])
    with reference_ops():
        runs = [[c.tokens for c in gen.generate_completions([[1, 2], [3, 4]], params, seed_keys=[0, key])]
                for key in (7, np.int64(7), torch.tensor(7))]  # fmt: skip
    assert runs[0] == runs[1] == runs[2]


def test_seed_keys_as_an_array_or_a_tensor():
    """Dataset indices held as a numpy array or a 1-d integer tensor key the same streams as a list (the truth test
    of seed_keys raised "ambiguous"); a lone integer instead of a sequence is refused by name before anything runs."""
    import numpy as np

    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=16, max_model_len=12)
    params = GenerateConfig(temperature=1.0, max_new_tokens=3, seed=5, ignore_eos=True)
    for bad in (5, np.int64(5), torch.tensor(5), torch.tensor([[5]])):
        with pytest.raises(ValueError, match=r"seed_keys must be a sequence of one integer per prompt, got "):
            gen.generate_completions([[1, 2]], params, seed_keys=bad)
    assert gen.pool is None  # (refused before the KV cache is allocated)
    with reference_ops():
        runs = [[c.tokens for c in gen.generate_completions([[1, 2], [3, 4]], params, seed_keys=keys)]
                for keys in ([0, 7], np.array([0, 7]), torch.tensor([0, 7]), (0, 7))]  # fmt: skip
    assert runs[0] == runs[1] == runs[2] == runs[3]


def test_seeds_and_seed_keys_of_any_integer_dtype():
    """A seed or seed key held as a narrow numpy int (np.int32 dataset indices, say) keys the stream its value keys
    (it raised OverflowError: Python integer 4294967295 out of bounds for int32, after the cache was allocated), and a
    negative one in a narrow tensor the stream of that Python int."""
    import numpy as np

    for key in (np.int32(7), np.uint8(7), np.int16(7), torch.tensor(7, dtype=torch.int32)):
        assert seed_for(5, key, 1) == seed_for(5, 7, 1) and seed_for(key, 3, 1) == seed_for(7, 3, 1)
    assert seed_for(5, torch.tensor(-1, dtype=torch.int8), 0) == seed_for(5, -1, 0) == seed_for(5, np.int16(-1), 0)
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=16, max_model_len=12)
    with reference_ops():
        runs = [
            [c.tokens for c in gen.generate_completions([[1, 2], [3, 4]], params, seed_keys=keys)]
            for keys, params in [
                ([0, 7], GenerateConfig(temperature=1.0, max_new_tokens=3, seed=5, ignore_eos=True)),
                (np.array([0, 7], dtype=np.int32), GenerateConfig(temperature=1.0, max_new_tokens=3, seed=np.int32(5),
                                                                   ignore_eos=True)),
            ]
        ]  # fmt: skip
    assert runs[0] == runs[1]


def test_params_must_be_a_generate_config():
    """A dict of sampling settings, or seed_keys passed by position where params goes, is refused by name before
    anything runs (it raised AttributeError: 'list' object has no attribute 'n'); keywords override a config."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=16, max_model_len=12)
    for bad in ({"temperature": 0.0}, [0, 1]):
        with pytest.raises(ValueError, match=r"params must be a GenerateConfig or None, got (dict|list)"):
            gen.generate_completions([[1, 2], [3, 4]], bad)
        with pytest.raises(ValueError, match=r"params must be a GenerateConfig or None"):
            gen.generate([[1, 2], [3, 4]], bad, max_new_tokens=2)
    assert gen.pool is None  # (refused before the KV cache is allocated)


def test_every_eos_of_a_config_list_stops():
    """A config.json whose eos_token_id is a list (Llama 3's) keeps every id, writes the list back, and generation
    stops at any of them (here the first token greedy decoding emits, made an extra EOS)."""
    hf = ModelConfig.named("tiny").to_hf("lm")
    hf["eos_token_id"] = [2, 7]
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.eos_token_id, cfg.extra_eos_token_ids) == (2, (7,)) and cfg.to_hf("lm")["eos_token_id"] == [2, 7]
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    greedy = GenerateConfig(temperature=0.0, max_new_tokens=6)
    with reference_ops():
        (free,) = Generator(model, block_size=4, num_blocks=16, max_model_len=12).generate_completions([[1, 5]], greedy)
        assert len(free.tokens) == 6 and free.finish_reason == "length", free
        model.config.extra_eos_token_ids = (free.tokens[0],)
        (stopped,) = Generator(model, block_size=4, num_blocks=16, max_model_len=12).generate_completions(
            [[1, 5]], greedy
        )
    assert stopped.tokens == free.tokens[:1] and stopped.finish_reason == "stop"


def test_cache_too_small_for_one_sequence():
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    with pytest.raises(ValueError, match="fewer than one sequence of max_model_len=64 needs"):
        Generator(model, block_size=4, num_blocks=8, max_model_len=64).generate([[1, 2]], max_new_tokens=2)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(max_model_len=0), "max_model_len must be >= 1, got 0"),  # (a 0 read as "unset" before)
        (dict(kv_cache_bytes=0), "kv_cache_bytes must be >= 1, got 0"),
        (dict(block_size=0, num_blocks=0), "block_size must be >= 1, got 0; num_blocks must be >= 1, got 0"),
        (dict(kv_cache_fraction=1.5), r"kv_cache_fraction must be in \(0, 1\], got 1.5"),
        (dict(block_size=3), r"block_size 3 must be a power of two"),  # (when built, not at the first generate)
        (dict(block_size=-4), r"^block_size must be >= 1, got -4$"),  # (that alone: no power-of-two clause)
        # (a float or bool count failed at the first generate: "empty(): argument 'size' failed to unpack")
        (dict(kv_cache_bytes=1e6), "kv_cache_bytes must be an integer, got 1000000.0"),
        (dict(num_blocks=16.0, max_num_seqs=2.5), "max_num_seqs must be an integer, got 2.5; .*num_blocks must be an "),
        (dict(block_size=4.0), "block_size must be an integer, got 4.0"),
        (dict(max_model_len=True), "max_model_len must be an integer, got True"),
    ],
)
def test_nonsense_generator_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match="runs an engine.model.Transformer, got a Linear: .*load_pretrained"):
        Generator(torch.nn.Linear(2, 2))  # (a transformers model failed on its missing .head: AttributeError)
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    with pytest.raises(ValueError, match=message):
        Generator(model, **kw)
    for bad, message in [
        (dict(temperature=float("nan")), "temperature must be >= 0 and finite, got nan"),
        (dict(temperature=float("inf")), "temperature must be >= 0 and finite, got inf"),
        (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids, got 5"),
        (dict(stop_token_ids=[2, 2.0]), r"stop_token_ids must be a list of token ids, got \[2, 2.0\]"),
        # (an iterator was used up by the check: the stop tokens silently ignored)
        (dict(stop_token_ids=map(int, [2, 3])), "stop_token_ids must be a list of token ids, got <map"),
        (dict(stop_token_ids=None), "stop_token_ids must be a list of token ids, got None"),
        (dict(temperature=None), "temperature must be a number, got None"),  # (TypeErrors from the comparison)
        (dict(top_p="0.9"), "top_p must be a number, got '0.9'"),
        (dict(temperature=True), "temperature must be a number, got True"),  # (not a temperature of 1)
        (dict(stop_token_ids=b"\x02"), r"stop_token_ids must be a list of token ids, got b'\\x02'"),  # (not [2])
        (dict(seed=1.5), "seed must be an integer or None, got 1.5"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1, got 2.5"),  # (not 3 tokens quietly)
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (dict(n=2.0), r"n must be an integer >= 1, got 2\.0"),
        (dict(n=True), "n must be an integer >= 1, got True"),
        (dict(top_k=2.5), r"top_k must be an integer >= 0, got 2\.5"),
        (dict(top_k=-1), "top_k must be an integer >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            GenerateConfig(**bad)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_vanishing_temperature_samples_the_greedy_token(top_p):
    """logits / T overflows float32 near T = 1e-37 (every positive logit +inf, the first of them drawn): such a
    temperature draws the argmax, its limit, on the one-pass path and the top-p path alike."""
    torch.manual_seed(0)
    logits = 20 + torch.randn(16, 300)
    seeds, counters = torch.arange(16), torch.arange(16)
    greedy, _ = sample_tokens(logits, GenerateConfig(temperature=0.0), seeds, counters)
    for t in (1e-30, 1e-38, 1e-45):
        tokens, logprobs = sample_tokens(logits, GenerateConfig(temperature=t, top_p=top_p, top_k=5), seeds, counters)
        assert torch.equal(tokens, greedy), t
        torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, greedy[:, None]).squeeze(-1))


# ----------------------------------------------------------------------------------- sampler --


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> bool:
    """Pearson chi-square against the expected distribution, at a 1e-4 false-alarm rate."""
    keep = probs > 0
    assert (counts[~keep] == 0).all(), "sampled a token the filter removed"
    exp = probs[keep] * n
    stat = ((counts[keep] - exp) ** 2 / exp).sum().item()
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square quantile at p = 1 - 1e-4 (z = 3.719)
    z = 3.719
    bound = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3 if dof > 0 else 0
    return stat <= bound


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.9)],
)
def test_sampler_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(12) * 1.5
    n = 40000
    params = GenerateConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    seeds = torch.full((n,), 77, dtype=torch.int64)
    counters = torch.arange(n, dtype=torch.int64)
    with reference_ops():  # the reference's distribution (the kernel samples the same tokens: test_sampling.py)
        tokens, logprobs = sample_tokens(logits.expand(n, -1), params, seeds, counters)
    counts = torch.bincount(tokens, minlength=12).double()
    # expected, written out independently of filter_logits, in HF's order: top-k first, then top-p on
    # the renormalised top-k distribution
    p = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(p, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    total = sum(p[i].item() for i in order)
    keep = torch.zeros(12, dtype=torch.bool)
    mass = 0.0
    for idx in order:
        if top_p < 1.0 and mass >= top_p:
            break
        keep[idx] = True
        mass += p[idx].item() / total
    expected = torch.where(keep, p, 0.0)
    expected /= expected.sum()
    assert _chi2_ok(counts, expected, n)
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[tokens])


def test_sampler_noise_is_a_pure_function_of_seed_and_counter():
    seeds = torch.tensor([1, 1, 2], dtype=torch.int64)
    counters = torch.tensor([5, 5, 5], dtype=torch.int64)
    u = uniform_noise(seeds, counters, 1000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


def test_filter_keeps_at_least_one_token():
    logits = torch.tensor([[10.0, 0.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, 0, 0.01)).sum() == 1
    assert torch.isfinite(filter_logits(logits, 1, 1.0)).sum() == 1


def test_filter_top_k_one_below_the_vocabulary_drops_the_smallest():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
    assert torch.isfinite(filter_logits(logits, 3, 1.0)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, 4, 1.0)).all()


def test_top_p_sums_probabilities_in_float32():
    """A token whose predecessors hold 0.4999 of the mass stays under top_p 0.5 (in fp16 the sum would round to 0.5)."""
    logits = torch.tensor([[0.4999, 0.3, 0.2001]]).log()
    assert torch.isfinite(filter_logits(logits, 0, 0.5)).tolist() == [[True, True, False]]


@pytest.mark.parametrize("top_p", [1.0, 0.9], ids=["one_pass", "top_p"])
def test_a_small_temperature_above_the_limit_still_samples(top_p):
    """Temperature 1e-4 is not greedy: two tied logits are each drawn (greedy would take the first every time)."""
    n = 64
    logits = torch.tensor([[5.0, 5.0, 0.0, -1.0]]).expand(n, -1).contiguous()
    tokens, _ = sample_tokens(logits, GenerateConfig(temperature=1e-4, top_p=top_p), torch.arange(n), torch.arange(n))
    assert set(tokens.tolist()) == {0, 1}


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_huge_temperature_never_draws_a_masked_logit(top_p):
    """A temperature past float32's range (1e300: finite, so accepted) turned into inf in the kernel's float32, and
    -inf / inf is NaN: a -inf logit (a tensor-parallel rank's vocabulary padding) was drawn, its log-prob -inf. Such
    a temperature samples what float32's largest does: uniformly over the real logits."""
    n = 64
    logits = torch.randn(n, 10)
    logits[:, -3:] = float("-inf")
    seeds, counters = torch.arange(n), torch.arange(n)
    tokens, logprobs = sample_tokens(logits, GenerateConfig(temperature=1e300, top_p=top_p), seeds, counters)
    assert tokens.max() < 7 and len(set(tokens.tolist())) > 3 and torch.isfinite(logprobs).all()
    largest = GenerateConfig(temperature=torch.finfo(torch.float32).max, top_p=top_p)
    assert torch.equal(tokens, sample_tokens(logits, largest, seeds, counters)[0])


def test_top_p_that_drops_nothing_samples_what_the_one_pass_path_samples():
    """The top-p path draws with the same noise (seed, counter) as the fused one: when top-p keeps every token the
    tokens are the same."""
    torch.manual_seed(0)
    n = 32
    logits = torch.randn(n, 50)
    seeds, counters = torch.arange(n), torch.arange(n) * 3
    a, la = sample_tokens(logits, GenerateConfig(temperature=1.0, top_p=1.0), seeds, counters)
    b, lb = sample_tokens(logits, GenerateConfig(temperature=1.0, top_p=0.999999), seeds, counters)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb)


def test_seed_for_depends_on_the_seed_the_prompt_and_the_sample():
    seeds = {seed_for(b, p, s) for b in range(3) for p in range(4) for s in range(4)}
    assert len(seeds) == 3 * 4 * 4 and all(0 <= x < 2**32 for x in seeds)
    assert seed_for(7, 2, 1) == seed_for(7, 2, 1)


def _eager_graphs(monkeypatch):
    """Stand in for CUDA graph capture on CPU: a 'replay' re-runs the forward on the static buffers."""
    import engine.generate as generate
    from engine.decode_graphs import DecodeGraphs
    from engine.model import attention_context

    class EagerGraphs(DecodeGraphs):
        def _capture_one(self, b, mempool):
            out = self._forward(b)

            def replay():
                # the cache views as they are now (a real graph holds no reference that keeps the cache alive)
                with attention_context(self.context(b)):
                    out.copy_(self._forward(b))

            return replay, out

    monkeypatch.setattr(generate, "DecodeGraphs", EagerGraphs)


def test_graph_decode_path_matches_eager(monkeypatch):
    """The CUDA-graph decode path's static buffers, padding and buckets, with an eager 'replay'
    (the forward re-run on the static buffers) standing in for a captured graph on CPU."""

    _eager_graphs(monkeypatch)
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.05, seed=2)
    prompts = _prompts(512, [3, 7, 1, 12, 5], seed=4)
    params = GenerateConfig(temperature=0.8, max_new_tokens=9, seed=5, n=2, stop_token_ids=list(range(100, 160)))
    with reference_ops():
        eager = Generator(model, block_size=4, num_blocks=64, max_num_seqs=12, max_model_len=32).generate_completions(
            prompts, params
        )
        gen = Generator(model, block_size=4, num_blocks=64, max_num_seqs=12, max_model_len=32, use_cuda_graphs=True)
        graphed = gen.generate_completions(prompts, params)
    assert gen._graphs is not None and gen._graphs.buckets == [1, 2, 4, 8, 12]
    assert [c.tokens for c in graphed] == [c.tokens for c in eager]
    assert any(c.finish_reason == "stop" for c in eager)  # sequences left the batch at different steps
    torch.testing.assert_close(
        torch.tensor([x for c in graphed for x in c.logprobs]), torch.tensor([x for c in eager for x in c.logprobs])
    )


def test_graph_capture_compiles_every_buckets_kernels_ahead(monkeypatch):
    """Before the captures, each bucket's warm-up forward goes to dispatch.compile_ahead (on a GPU: its kernels
    compiled at once); run here as they are (the reference ops), they leave the graphs' tokens as eager decoding's."""
    import engine.decode_graphs as decode_graphs

    _eager_graphs(monkeypatch)
    calls = []

    def record(fns):
        calls.append(len(fns))
        for fn in fns:
            fn()

    monkeypatch.setattr(decode_graphs, "compile_ahead", record)
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.05, seed=2)
    prompts = _prompts(512, [3, 7, 1, 12, 5], seed=4)
    kw = dict(block_size=4, num_blocks=64, max_num_seqs=12, max_model_len=32)
    params = GenerateConfig(temperature=0.8, max_new_tokens=6, seed=5)
    with reference_ops():
        eager = Generator(model, **kw).generate(prompts, params)
        gen = Generator(model, use_cuda_graphs=True, **kw)
        assert gen.generate(prompts, params) == eager
    assert calls == [len(gen._graphs.buckets)] == [5]


def test_graph_buckets_of_a_large_batch_and_a_full_one(monkeypatch):
    """Buckets 1, 2, 4, 8, then every 16 up to max_num_seqs (itself the last), in order; a batch of exactly
    max_num_seqs replays the largest."""
    _eager_graphs(monkeypatch)
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.05, seed=2)
    prompts = _prompts(512, [3, 5, 2, 4] * 10, seed=4)
    kw = dict(block_size=4, num_blocks=128, max_num_seqs=40, max_model_len=16)
    params = GenerateConfig(temperature=0.8, max_new_tokens=3, seed=5)
    with reference_ops():
        gen = Generator(model, use_cuda_graphs=True, **kw)
        assert gen.generate(prompts, params) == Generator(model, **kw).generate(prompts, params)
    assert gen._graphs.buckets == [1, 2, 4, 8, 16, 32, 40]


def test_graph_key_names_the_cache_shape_as_well_as_its_address():
    """A cache allocated anew at the same address with another number of blocks is another graph's."""
    from engine.decode_graphs import graph_key

    model = Transformer(ModelConfig.named("tiny"))
    pool = torch.zeros(2, 6, 4)
    assert graph_key(model, pool) == graph_key(model, pool.view(2, 6, 4))
    assert graph_key(model, pool) != graph_key(model, pool[:, :5])


def test_decode_graphs_outlive_the_training_phase_only_where_still_valid(monkeypatch):
    """Graphs stay across calls and across release() when the cache and every parameter keep their storage
    (an in-place update, as the trainer's), and are captured anew when either moved."""
    _eager_graphs(monkeypatch)
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.05, seed=2)
    prompts = _prompts(512, [3, 7, 1], seed=4)
    kw = dict(block_size=4, num_blocks=64, max_num_seqs=4, max_model_len=32)
    params = GenerateConfig(temperature=0.8, max_new_tokens=5, seed=5)

    def eager():
        return Generator(model, **kw).generate(prompts, params)

    with reference_ops():
        gen = Generator(model, use_cuda_graphs=True, **kw)
        first = gen.generate(prompts, params)
        graphs = gen._graphs
        assert gen.stats.graph_captures == len(graphs.buckets) == 3 and first == eager()

        with torch.no_grad():  # an optimizer step: in place
            for p in model.parameters():
                p.mul_(1.5)
        assert gen.generate(prompts, params) == eager() != first
        assert gen._graphs is graphs and gen.stats.graph_captures == 0

        held = gen.pool.tensor  # the next cache cannot come back at this address
        gen.release()
        assert gen._graphs is graphs
        assert gen.generate(prompts, params) == eager()
        assert gen._graphs is not graphs and gen.stats.graph_captures == 3
        assert gen.pool.tensor.data_ptr() != held.data_ptr()
        graphs = gen._graphs

        w = model.layers[0].mlp.down_proj  # a parameter replaced by a new tensor (not in place)
        w.weight = torch.nn.Parameter(w.weight.detach() * -1.0)
        assert gen.generate(prompts, params) == eager()
        assert gen._graphs is not graphs and gen.stats.graph_captures == 3

        gen.release(drop_graphs=True)
        assert gen._graphs is None


def test_an_aborted_call_leaks_no_block(monkeypatch):
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=64, max_model_len=32)
    calls = {"n": 0}
    real = gen._decode

    def failing_decode(seqs, last=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return real(seqs, last)

    monkeypatch.setattr(gen, "_decode", failing_decode)
    with reference_ops(), pytest.raises(RuntimeError, match="device lost"):
        gen.generate([[1, 2, 3], [4, 5]], GenerateConfig(temperature=0.0, max_new_tokens=8, n=2, ignore_eos=True))
    assert gen.blocks.num_free_blocks == 64 and gen.blocks.num_sequences == 0
    monkeypatch.undo()
    with reference_ops():
        assert len(gen.generate([[1, 2, 3]], max_new_tokens=3, ignore_eos=True)[0]) == 3


def test_fp8_kv_cache():
    """kv_cache_dtype="fp8": a quarter of an fp32 cache's bytes per block (so 4x the blocks in one budget); the
    kernel path samples what the reference path samples from the same float8 cache; the log-probs differ from the
    model-dtype cache's from the first token on (the prefill attends to the K/V the cache holds, rounded to float8,
    as the decode steps read them: the cache really holds float8); and so a sample does not depend on its batch or
    on being preempted (a recomputed prompt's prefill sees what its decode steps saw)."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.05, seed=3)
    prompts = _prompts(512, [3, 9, 17, 1], seed=6)
    params = GenerateConfig(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    kw = dict(block_size=4, kv_cache_bytes=2**20, max_model_len=64)
    fp8 = Generator(model, kv_cache_dtype="fp8", **kw)
    exact = Generator(model, **kw)
    got = fp8.generate_completions(prompts, params)
    with reference_ops():
        want = fp8.generate_completions(prompts, params)
        exact_comps = exact.generate_completions(prompts, params)
    assert fp8.pool.tensor.dtype == torch.float8_e4m3fn and fp8.pool.num_blocks == 4 * exact.pool.num_blocks
    assert [c.tokens for c in got] == [c.tokens for c in want]
    flat = lambda comps, sl: torch.tensor([x for c in comps for x in c.logprobs[sl]])  # noqa: E731
    torch.testing.assert_close(flat(got, slice(None)), flat(want, slice(None)), atol=1e-5, rtol=1e-5)
    assert not torch.equal(flat(want, slice(0, 1)), flat(exact_comps, slice(0, 1)))
    assert not torch.equal(flat(want, slice(1, 2)), flat(exact_comps, slice(1, 2)))
    sampled = GenerateConfig(temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=5)
    many = _prompts(512, [(i * 7) % 23 + 1 for i in range(24)], seed=2)
    with reference_ops():
        alone = [
            Generator(model, kv_cache_dtype="fp8", **kw).generate_completions([p], sampled, seed_keys=[i])[0]
            for i, p in enumerate(many)
        ]
        tight = Generator(model, kv_cache_dtype="fp8", block_size=4, num_blocks=24, max_model_len=40, max_num_seqs=8)
        batched = tight.generate_completions(many, sampled)
    assert tight.stats.preemptions > 0
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    torch.testing.assert_close(flat(batched, slice(None)), flat(alone, slice(None)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kv_cache_dtype 'float16'"):
        Generator(model, kv_cache_dtype="float16")


def test_cache_keeps_its_size_across_small_budget_changes():
    """After release(), a budget up to 25% larger keeps the last block count (the same-size allocation is what
    lets the decode graphs replay); a larger budget grows the cache, a smaller one shrinks it."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    c = model.config
    per_block = bytes_per_block(c.num_layers, 4, c.num_kv_heads, c.head_dim, torch.float32)
    gen = Generator(model, block_size=4, kv_cache_bytes=100 * per_block, max_model_len=32)
    sizes = []
    for budget in (100, 110, 130, 90):
        gen.kv_cache_bytes = budget * per_block
        with reference_ops():
            gen.generate([[1, 5, 9]], temperature=0.0, max_new_tokens=2)
        sizes.append(gen.pool.num_blocks)
        gen.release()
    assert sizes == [100, 100, 130, 90]


def test_the_cache_holds_no_more_than_every_slot_can_use():
    """A budget larger than max_num_seqs sequences of max_model_len can fill (a small model on a large GPU) gives
    that many blocks, not the budget's; a smaller budget gives what fits."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=2)
    params = GenerateConfig(temperature=0.0, max_new_tokens=3)
    big = Generator(model, block_size=4, kv_cache_bytes=2**30, max_model_len=40, max_num_seqs=3)
    big.generate(_prompts(512, [5, 7], seed=1), params)
    assert big.pool.num_blocks == 3 * 10
    small = Generator(model, block_size=4, kv_cache_bytes=2**16, max_model_len=40, max_num_seqs=64)
    small.generate(_prompts(512, [5, 7], seed=1), params)
    per_block = small.pool.nbytes // small.pool.num_blocks
    assert small.pool.num_blocks == 2**16 // per_block < 64 * 10


def test_a_stop_token_on_the_last_allowed_position_is_a_stop():
    from engine.generate import Generator

    k = 5
    for seed in range(20):
        model = Transformer(ModelConfig.named("tiny"), dtype=torch.float32).init_weights(seed=seed)
        greedy = GenerateConfig(temperature=0.0, max_new_tokens=k, ignore_eos=True)
        with reference_ops():
            (free,) = Generator(model, block_size=4, num_blocks=16, max_model_len=16).generate_completions(
                [[1, 5]], greedy
            )
        if free.tokens[-1] not in free.tokens[:-1]:
            break
    else:
        pytest.skip("no seed whose last greedy token is new")
    params = GenerateConfig(temperature=0.0, max_new_tokens=k, stop_token_ids=[free.tokens[-1]], ignore_eos=True)
    with reference_ops():
        (c,) = Generator(model, block_size=4, num_blocks=16, max_model_len=16).generate_completions([[1, 5]], params)
    assert c.tokens == free.tokens and c.finish_reason == "stop"


def test_top_p_keeps_the_token_that_reaches_exactly_top_p_and_every_tie():
    """The mass before the second token is exactly 0.5: the first reaches top_p 0.5, so it alone is kept. Four equal
    logits under top_p 0.5 are all kept (the floor is their value; HF's warper keeps two, by its sort's order)."""
    from engine.sampler import filter_logits

    out = filter_logits(torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log(), 0, 0.5)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(torch.zeros(1, 4), 0, 0.5)).sum() == 4


def _sample_counts(logits, params, n=4000):
    seeds = torch.full((n,), 11, dtype=torch.int64)
    counters = torch.arange(n, dtype=torch.int64)
    with reference_ops():
        tokens, _ = sample_tokens(logits.expand(n, -1).contiguous(), params, seeds, counters)
    return torch.bincount(tokens, minlength=logits.shape[-1])


def test_top_p_applies_to_the_temperature_scaled_distribution():
    counts = _sample_counts(torch.tensor([2.0, 1.0, 0.0]), GenerateConfig(temperature=0.5, top_p=0.7))
    assert counts[1] == 0 and counts[2] == 0


def test_top_k_keeps_ties_on_the_top_p_path():
    counts = _sample_counts(torch.tensor([3.0, 2.0, 2.0, 0.0]), GenerateConfig(temperature=1.0, top_k=2, top_p=0.99))
    assert counts[1] > 0 and counts[2] > 0 and counts[3] == 0


def test_top_k_above_the_vocabulary_is_no_filter():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    seeds, counters = torch.arange(3), torch.arange(3)
    with reference_ops():
        a, _ = sample_tokens(logits, GenerateConfig(temperature=1.0, top_k=50), seeds, counters)
        b, _ = sample_tokens(logits, GenerateConfig(temperature=1.0, top_k=0), seeds, counters)
    assert torch.equal(a, b)


@pytest.mark.parametrize("step", ["_prefill_and_decode", "_prefill"])
def test_a_step_out_of_blocks_puts_its_admitted_prompts_back(monkeypatch, step):
    """The blocks run out in a step that admits prompts (here: the step's first call raises as an append would):
    the admitted prompts wait again with their blocks freed, and the run samples exactly what an untroubled one does
    (the noise is keyed by seed and position, not by the step), with no block lost."""
    from engine.kv_cache import OutOfBlocks

    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=2)
    prompts = _prompts(512, [3, 11, 1, 7, 16, 5], seed=4)  # (stop tokens free slots mid-run: prompts ride along)
    params = GenerateConfig(temperature=1.0, max_new_tokens=7, stop_token_ids=list(range(3, 40)), seed=5)

    def run():
        gen = Generator(model, block_size=4, num_blocks=64, max_model_len=40, max_num_seqs=3)
        with reference_ops():
            return gen, [c.tokens for c in gen.generate_completions(prompts, params)]

    _, want = run()
    real, calls = getattr(Generator, step), []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OutOfBlocks(1, 0)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Generator, step, flaky)
    gen, got = run()
    assert len(calls) > 1 and got == want
    gen.blocks.check_invariants()
    assert gen.blocks.num_free_blocks == 64 and gen.blocks.num_sequences == 0


@pytest.mark.parametrize("n", [1, 2])
def test_a_cache_of_every_slot_at_full_length_admits_every_slot_at_once(n):
    """The cache holds max_num_seqs sequences of max_model_len (its cap): prompts of about a block whose whole length
    fits in it are admitted together (they waited in waves: a free block per sequence was kept for growth that none
    of them has left), and sample what a roomier cache samples."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=2)
    prompts = _prompts(512, [8, 8], seed=4)
    params = GenerateConfig(temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=5, n=n)
    kw = dict(block_size=16, max_model_len=16, max_num_seqs=2 * n)
    with reference_ops():
        capped = Generator(model, kv_cache_bytes=2**30, **kw)
        got = capped.generate(prompts, params)
        want = Generator(model, num_blocks=64, **kw).generate(prompts, params)
    assert capped.pool.num_blocks == 2 * n  # (the cap: a block of 16 per slot)
    assert (capped.stats.prefill_steps, capped.stats.decode_steps, capped.stats.preemptions) == (1, 7, 0)
    assert got == want


def test_a_prefill_takes_at_most_max_num_batched_tokens():
    """Prompts are packed into one prefill forward up to max_num_batched_tokens (a longer prompt goes alone); the
    samples are those of one large prefill."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=2)
    prompts = _prompts(512, [5, 5, 12, 5], seed=4)
    params = GenerateConfig(temperature=1.0, max_new_tokens=3, ignore_eos=True, seed=5)
    make = lambda budget: Generator(  # noqa: E731
        model, block_size=4, num_blocks=64, max_model_len=32, max_num_batched_tokens=budget, mix_prefill=False
    )
    with reference_ops():
        small, big = make(10), make(8192)
        got, want = small.generate(prompts, params), big.generate(prompts, params)
    assert got == want
    assert big.stats.prefill_steps == 1 and small.stats.prefill_steps == 3  # [5, 5], [12] alone, [5]
    assert small.stats.prefill_tokens == big.stats.prefill_tokens == 27


def test_the_limits_themselves_are_accepted():
    """n == max_num_seqs, and a cache of exactly one sequence at max_model_len, are allowed (and run)."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    params = GenerateConfig(temperature=1.0, max_new_tokens=100, ignore_eos=True, seed=3, n=2)
    with reference_ops():
        gen = Generator(model, block_size=4, num_blocks=3, max_model_len=12, max_num_seqs=2)
        comps = gen.generate_completions([[1] * 9], params)
    assert [len(c.tokens) for c in comps] == [3, 3] and {c.finish_reason for c in comps} == {"length"}
    gen.blocks.check_invariants()
    assert gen.blocks.num_free_blocks == 3


def test_admission_headroom_counts_kv_slots_up_to_max_len_minus_one():
    """A sequence of max_len tokens holds the K/V of max_len - 1 (its last token is sampled, never fed back): prompts
    of 8 tokens to end at 17 need one block of 16 each, so in a cache of two blocks the second prompt (its own prefill
    after the first's: the token budget) joins the running first one at once: no headroom is kept for a second block
    that neither will take. They sample what a roomier cache samples."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=2)
    prompts = _prompts(512, [8, 8], seed=4)
    params = GenerateConfig(temperature=1.0, max_new_tokens=9, ignore_eos=True, seed=5)
    kw = dict(block_size=16, max_model_len=17, max_num_seqs=2, max_num_batched_tokens=8)
    with reference_ops():
        tight = Generator(model, num_blocks=2, **kw)
        got = tight.generate(prompts, params)
        want = Generator(model, num_blocks=64, **kw).generate(prompts, params)
    st = tight.stats
    assert (st.prefill_steps, st.mixed_steps, st.decode_steps, st.preemptions) == (1, 1, 9, 0), st
    assert got == want and all(len(t) == 9 for t in got)


def test_numpy_int32_counts_do_not_wrap_around():
    """GenerateConfig and Generator keep their counts as Python ints: a numpy int32 max_new_tokens near 2**31 wrapped
    around in prompt length + max_new_tokens (a negative length limit: every sequence ended at once), and numpy int32
    sizes overflowed in the cache's byte sums."""
    import numpy as np

    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    params = GenerateConfig(temperature=0.0, max_new_tokens=np.int32(2**31 - 1), ignore_eos=True, seed=np.int32(7))
    assert type(params.max_new_tokens) is int and type(params.seed) is int and type(params.n) is int
    gen = Generator(model, block_size=np.int32(4), num_blocks=np.int64(16), max_model_len=np.int32(12))
    assert type(gen.block_size) is int and type(gen.max_model_len) is int
    with reference_ops():
        comps = gen.generate_completions([[1, 2, 3]], params)
    assert len(comps[0].tokens) == 9 and comps[0].finish_reason == "length"


def test_a_slot_freed_by_a_length_limit_is_filled_in_the_next_step(monkeypatch):
    """With overlap (the default) the host knows, before it reads the step in flight, which sequences end with it at
    their length limit: their slots go to waiting prompts in the next step, so a prompt joins the next decode as it
    does without overlap. Counted forwards: a 9-token prompt with 1 new token (max_model_len 10) and two of 3 with
    2, two slots: prefill(A, B); prefill(C) + decode(B); decode(C): three forwards, one of prompts alone (before,
    with overlap: four, C's prefill alone a step late)."""
    calls = []
    for name in ("_prefill", "_prefill_and_decode", "_decode"):
        real = getattr(Generator, name)
        monkeypatch.setattr(
            Generator, name, lambda self, *a, _r=real, _n=name, **k: calls.append(_n) or _r(self, *a, **k)
        )
    model = Transformer(ModelConfig.named("tiny")).init_weights(std=0.3, seed=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (9, 3, 3)]
    params = GenerateConfig(temperature=0.0, max_new_tokens=2, ignore_eos=True)
    out = {}
    with reference_ops():
        for overlap in (False, True):
            calls.clear()
            gen = Generator(model, block_size=4, num_blocks=64, max_model_len=10, max_num_seqs=2, overlap=overlap)
            out[overlap] = gen.generate(prompts, params), list(calls)
    assert out[True][0] == out[False][0] and [len(t) for t in out[True][0]] == [1, 2, 2]
    assert out[True][1] == out[False][1] == ["_prefill", "_prefill_and_decode", "_decode"], out


@pytest.mark.parametrize("fraction", ["0.5", None, True])
def test_a_kv_cache_fraction_that_is_not_a_number_is_refused_by_name(fraction):
    """A library user passing kv_cache_fraction as the string "0.5" (read from a config file) or None got a bare
    TypeError "'<' not supported between instances of 'int' and 'str'" naming no setting; True was taken as 1."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    with pytest.raises(ValueError, match=f"kv_cache_fraction must be a number in \\(0, 1\\], got {fraction!r}"):
        Generator(model, kv_cache_fraction=fraction)


def test_a_prompt_given_as_a_set_or_a_tokenizer_output_is_refused():
    """A set of token ids was generated from in its hash order (a silently different prompt: {5, 300, 7} read as
    [300, 5, 7]); a tokenizer's output dict was refused only as "'input_ids' ... token ids are integers"."""
    model = Transformer(ModelConfig.named("tiny")).init_weights(seed=0)
    gen = Generator(model, block_size=4, num_blocks=16, max_model_len=16)
    with pytest.raises(ValueError, match="prompt 0 is a set, not a sequence of token ids"):
        gen.generate([{300, 5, 7}], max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt 1 is a dict, .*pass its input_ids"):
        gen.generate([[5, 7], {"input_ids": [5, 7], "attention_mask": [1, 1]}], max_new_tokens=1)
