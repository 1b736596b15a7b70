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
