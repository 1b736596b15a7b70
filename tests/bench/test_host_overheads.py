"""bench/host_overheads.py at tiny sizes: the host timings are figures, and the rollout's counts add up (no timing
thresholds)."""

import json
import math

import pytest
import torch

SETTINGS = "default,at-once,admit-4,prefill-per-admission,no-overlap,no-mix"
TINY = ["--batches", "2,5", "--repeats", "7", "--width", "4", "--chunk", "8", "--prompts", "24", "--slots", "8",
        "--prompt-min", "3", "--prompt-max", "12", "--max-new", "16", "--stop-tokens", "40"]  # fmt: skip


def test_host_overheads_counts_add_up(tmp_path, capsys):
    from bench.host_overheads import main

    threads = torch.get_num_threads()
    out = tmp_path / "h.json"
    result = main([*TINY, "--settings", SETTINGS, "--json", str(out)])
    assert torch.get_num_threads() == threads  # (--threads is the run's only)
    saved = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the bench's JSON"))
    assert saved["rollout"] == json.loads(json.dumps(result["rollout"]))
    printed = capsys.readouterr().out

    # part 1: a positive, finite median of each figure at each batch, over the calls asked for
    assert [(r["batch"], r["width"], r["repeats"]) for r in saved["host"]] == [(2, 4, 7), (5, 4, 7)]
    for r in saved["host"]:
        for key in ("block_table_ms", "prepare_decode_ms", "python_lists_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert [r["python_lists_repeats"] for r in saved["host"]] == [7, 7] and "the median of 7 calls" in printed

    # part 2: one row per setting, in order, each printed
    rows = {r["setting"]: r for r in saved["rollout"]}
    assert list(rows) == SETTINGS.split(",")
    for r in rows.values():
        assert r["label"] in printed
    default, at_once, four, apart, sync, no_mix = rows.values()
    assert (default["mix_prefill"], default["overlap"], default["admit_min_seqs"]) == (True, True, 1)  # (8 // 16)
    assert four["admit_min_seqs"] == 4
    assert (apart["mix_prefill"], apart["overlap"], apart["admit_min_seqs"]) == (False, False, 1)
    responses = saved["responses"]
    assert 1 <= responses["min"] < responses["max"] <= 16 and responses["stopped"] > 0  # (varied lengths)
    for r in rows.values():
        name = r["setting"]
        # forwards counted at the model's embedding: a prompt-only forward or a decode step each, nothing else
        assert r["forwards"] == r["prefill_steps"] + r["decode_steps"], name
        assert r["prefill_steps"] >= 1 and 0 <= r["mixed_steps"] <= r["decode_steps"], name
        assert 0 <= r["overlapped_steps"] <= r["decode_steps"], name
        assert r["preemptions"] == 0, name  # (a cache of every slot at full length)
        # the stats' tokens are the completions', and every setting samples the same ones (counter-based sampling)
        assert r["generated_tokens"] == r["completion_tokens"] == default["completion_tokens"], name
        assert r["same_samples"] and r["samples_digest"] == default["samples_digest"], name
        assert r["prefill_tokens"] == default["prefill_tokens"], name  # the same prompts through the model
        if r["overlap"]:  # a stopped sequence is decoded once more at most; its extra token dropped
            assert 0 <= r["dropped_rows"] <= responses["stopped"], name
        else:  # each decode row is a kept token, the first token of each response the prompt's
            assert r["overlapped_steps"] == 0 and r["dropped_rows"] == 0, name
            assert r["decode_rows"] + 24 == r["completion_tokens"], name
        if not r["mix_prefill"]:
            assert r["mixed_steps"] == 0, name
    # prompts riding along in decode steps save forwards against a forward of their own per admission
    assert at_once["forwards"] < apart["forwards"] and at_once["prefill_steps"] < apart["prefill_steps"]
    assert sync["forwards"] < apart["forwards"] and at_once["mixed_steps"] > 0
    assert no_mix["mixed_steps"] == 0 and no_mix["overlapped_steps"] > 0
    # admitting once 4 slots are free: fewer steps carrying prompts, for as many or more steps in all
    assert four["mixed_steps"] < at_once["mixed_steps"] and four["decode_steps"] >= at_once["decode_steps"]
    # the default at 8 slots admits at once (8 // 16 is below 1): the same run, count for count
    assert default == {**at_once, "setting": "default", "label": default["label"], "seconds": default["seconds"]}


def test_host_overheads_parts_can_be_left_out(tmp_path, capsys):
    from bench.host_overheads import main

    result = main([*TINY, "--skip-rollout"])
    assert len(result["host"]) == 2 and result["rollout"] == []
    assert "PPO-like rollout" not in capsys.readouterr().out
    result = main([*TINY, "--skip-host", "--settings", "admit-3"])
    assert result["host"] == [] and [r["admit_min_seqs"] for r in result["rollout"]] == [3]


def test_host_overheads_refuses_impossible_flags(tmp_path, capsys):
    from bench.host_overheads import parse_args

    for flags, message in (
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--batches", "64,0"], "expected integers >= 1"),
        (["--batches", "a"], "expected comma-separated integers"),
        (["--prompt-min", "30", "--prompt-max", "20"], "--prompt-max 20 is below --prompt-min 30"),
        (["--settings", "default,fast"], "--settings fast: unknown"),
        (["--settings", "admit-0"], "--settings admit-0: unknown"),
        (["--settings", "default,default"], "names a setting twice"),
        (["--block-size", "12"], "--block-size must be a power of two"),
        (["--stop-tokens", "600"], "--stop-tokens must be in [0, 508)"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--json", str(tmp_path / "nodir" / "h.json")], "not a file in an existing directory"),
    ):
        with pytest.raises(SystemExit) as e:
            parse_args(flags)
        assert e.value.code == 2 and message in capsys.readouterr().err, flags
    assert parse_args(["--settings", "admit-2,no-mix"]).settings == ["admit-2", "no-mix"]
