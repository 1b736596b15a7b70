"""The rollout benchmark runs end to end on CPU and its figures are consistent (no timing asserted)."""

import json

from kernels.dispatch import reference_ops


def test_rollout_bench_smoke(tmp_path):
    from bench.rollout_throughput import decode_roofline, main
    from engine.config import ModelConfig

    out = tmp_path / "r.json"
    with reference_ops():
        result = main(["--batch", "3", "--prompt-len", "5", "--gen-len", "4", "--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ours"]["tokens"] == 3 * 4 == saved["hf_generate"]["tokens"]
    assert result["ours"]["tok_s"] > 0
    # the roofline: 13B bf16 weights alone at 3.0 TB/s, batch 1 -> about 115 tok/s (RECIPE.md)
    roof = decode_roofline(ModelConfig.named("llama2-13b"), 1, 0, 0, 2, 3.0e12)
    assert 110 < roof["tok_s"] < 120
    # batch 64, 128 + 256 at 3.0 TB/s: 4,907 tok/s decoding (RESULTS.md); with the prefill's 8,192 tokens at
    # 720 TFLOP/s (0.29 s against 3.3 s of decoding) about 4,530 from the prompts to the last token
    roof = decode_roofline(ModelConfig.named("llama2-13b"), 64, 128, 256, 2, 3.0e12, flops=720e12)
    assert 4900 < roof["tok_s"] < 4915 and 280 < roof["prefill_ms"] < 300 and 4500 < roof["tok_s_e2e"] < 4560
    assert saved["roofline"]["tok_s_e2e"] > 0 and saved["matmul_tflops"] > 0


def test_rollout_bench_refuses_impossible_flags(tmp_path, capsys):
    """0 is not the default in disguise, and a --json whose directory is missing is refused before the run."""
    import pytest

    from bench.rollout_throughput import parse_args

    for flags, message in (
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--gen-len", "0"], "--gen-len must be >= 1, got 0"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--json", str(tmp_path / "nodir" / "r.json")], "its directory does not exist"),
    ):
        with pytest.raises(SystemExit):
            parse_args(flags)
        assert message in capsys.readouterr().err
