"""The memory plan made before the models are loaded: parameter counts against transformers' and against the
model's own TP slices, the bytes of each part, and the refusal of a layout that cannot fit (with the ones that
would), in setup and from the command line."""

import dataclasses
import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from engine import memory_plan, offload
from engine.config import ModelConfig, PPOConfig
from engine.distributed import ProcessGrid
from engine.model import Transformer
from engine.preflight import check_memory
from engine.state import RunConfig
from tests.engine.fake_tp import FakeGroup, fake_tp
from tests.engine.hf_models import save_hf_model

GiB = 2**30


@pytest.mark.parametrize("head", ["lm", "score"])
@pytest.mark.parametrize("shape", ["llama2-13b", "tiny"])
def test_num_params_per_tp_rank(monkeypatch, head, shape):
    """num_params(head, tp): transformers' count at tp 1; at tp > 1 what a TP rank of our model holds (a meta-device
    model built with a stand-in group of that size)."""
    fake_tp(monkeypatch)
    c = ModelConfig.named(shape)
    cls = LlamaForCausalLM if head == "lm" else LlamaForSequenceClassification
    with torch.device("meta"):
        hf = cls(LlamaConfig(**c.to_hf(head)))
    assert c.num_params(head) == sum(p.numel() for p in hf.parameters())
    for tp in (2, 4, 8) if shape != "tiny" else (2,):
        ours = Transformer(c, head, group=FakeGroup(tp, tp - 1), dtype=torch.bfloat16, device="meta")
        assert c.num_params(head, tp) == sum(p.numel() for p in ours.parameters()), tp


def test_fixed_bytes_of_each_part():
    numels = {"policy": 1000, "reference": 1000, "value": 600, "reward": 600}
    parts = memory_plan.fixed_bytes(numels, ("policy", "value"), torch.bfloat16, 1, False)
    assert parts["weights (policy)"] == 2000 and parts["weights (reward)"] == 1200
    assert parts["optimizer (masters, Adam moments)"] == 12 * 1600 and parts["fp32 gradients"] == 4 * 1600
    sharded = memory_plan.fixed_bytes(numels, ("policy", "value"), torch.bfloat16, 4, True)
    pad = 3  # (a rank's share of each bucket's padding to a multiple of dp: one element of at most 3 buckets a model)
    assert sharded["optimizer (masters, Adam moments)"] == 12 * (1600 // 4 + 2 * pad)
    # the policy's whole, then both models' shards
    assert sharded["fp32 gradients"] == 4 * 1000 + 4 * (1600 // 4 + 2 * pad)
    fp32 = memory_plan.fixed_bytes(numels, ("policy", "value"), torch.float32, 1, False)  # the weights are masters
    assert fp32["weights (value)"] == 2400 and fp32["optimizer (masters, Adam moments)"] == 8 * 1600
    # the distributed optimizer keeps fp32 master shards of its own even for fp32 weights (engine.optim's buckets)
    fp32_sharded = memory_plan.fixed_bytes(numels, ("policy", "value"), torch.float32, 2, True)
    assert fp32_sharded["optimizer (masters, Adam moments)"] == 12 * (1600 // 2 + 2 * pad)


@pytest.mark.parametrize("dp", [2, 3])
def test_the_planned_optimizer_state_holds_what_each_rank_allocates(monkeypatch, dp):
    """The distributed optimizer pads each bucket to a multiple of dp, so a rank's shard is ceil(bucket / dp): the plan
    counted sum / dp, a few bytes short of the allocation at DP 3 (the plan's promise is an upper bound). Counted on
    the real optimizers of the trained models, a padded vocabulary and buckets of 4096 bytes, on every DP rank."""
    import dataclasses

    from engine.config import ModelConfig, PPOConfig
    from engine.distributed import ProcessGrid
    from engine.model import Transformer
    from engine.optim import make_optimizer

    monkeypatch.setattr(memory_plan, "BUCKET_BYTES", 4096)
    config = dataclasses.replace(ModelConfig.named("tiny"), vocab_size=513)
    heads = {"policy": "lm", "value": "score"}
    numels = {k: config.num_params(h, 1) for k, h in heads.items()}
    planned = memory_plan.fixed_bytes(numels, tuple(heads), torch.bfloat16, dp, True)[memory_plan.STATE]
    for rank in range(dp):
        grid = ProcessGrid(rank=rank, world_size=dp, tp=1, dp=dp)
        opts = [make_optimizer(Transformer(config, h, dtype=torch.bfloat16), PPOConfig(), grid, distributed=True,
                               bucket_bytes=4096) for h in heads.values()]  # fmt: skip
        state = [t for o in opts for t in o.masters] + [t for o in opts for v in o.adam.state.values()
                                                        for t in v.values() if t.numel() > 1]  # fmt: skip
        real = sum(t.numel() * t.element_size() for t in state)
        assert real <= planned < real + 2 * 12 * (2 * sum(numels.values()) * 4 // 4096 + 2), (rank, real, planned)


def test_a_tp_degree_that_does_not_divide_is_refused(capsys):
    configs = memory_plan.run_configs("llama3.1-8b", None, "llama3.1-8b")
    for tp, what in ((16, "key/value heads \\(8\\)"), (3, "attention heads \\(32\\)")):
        with pytest.raises(ValueError, match=f"--tp {tp} does not divide the policy model's {what}"):
            memory_plan.plan(configs, torch.bfloat16, tp, 1, True, 79 * GiB)
    with pytest.raises(SystemExit) as e:  # (the CLI: a usage error, exit 2, naming the degrees that do divide)
        memory_plan.main(["--policy", "llama3.1-8b", "--reward", "llama3.1-8b", "--tp", "16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--tp 16 does not divide the policy model's key/value heads (8)" in err
    assert "--tp 1, 2, 4 or 8 divides them" in err
    with pytest.raises(SystemExit):
        memory_plan.main(["--seq-len", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # (train_ppo refuses to train in float16; --eval-only serves it)
        memory_plan.main(["--dtype", "float16"])
    assert "--dtype float16 trains without loss scaling" in capsys.readouterr().err
    assert memory_plan.main(["--dtype", "float16", "--eval-only", "--tp", "1"]) == 0
    with pytest.raises(SystemExit):  # (no abbreviations: --seq took --seq-len)
        memory_plan.main(["--seq", "512"])
    assert "unrecognized arguments: --seq 512" in capsys.readouterr().err


def test_recipe_layouts_on_an_80gb_gpu():
    """The recipe's four 13B models: TP 8 fits one H100 80GB (with what is left said); TP 4 is refused naming TP 8
    and the DP size whose sharded optimizer would fit."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    free = 79 * GiB
    line = memory_plan.plan(configs, torch.bfloat16, 8, 1, False, free)
    assert line.startswith("memory plan: 60.") and "GiB left for KV cache and activations" in line
    c = ModelConfig.named("llama2-13b")
    lm, score = c.num_params("lm", 4), c.num_params("score", 4)  # (checked against transformers above)
    need = (2 * (2 * lm + 2 * score) + 12 * (lm + score) + 4 * (lm + score)) / GiB  # weights, Adam + masters, grads
    assert f"{need:.1f}" == "120.5"
    with pytest.raises(ValueError, match=r"need 120\.5 GiB of 79\.0 GiB free per GPU .*it would fit with --tp 8 or "
                       r"4 data-parallel ranks of --tp 4 \(16 GPUs\)"):  # fmt: skip
        memory_plan.plan(configs, torch.bfloat16, 4, 1, True, free)
    with pytest.raises(ValueError, match=r"it would fit with --tp 8 or --offload-optimizer always \("):  # (no DP)
        memory_plan.plan(configs, torch.bfloat16, 4, 1, False, free)


def test_optimizer_state_in_host_memory_lets_fewer_gpus_train():
    """--offload-optimizer always: a GPU holds the weights, the fp32 grads and three chunks of the state (one
    updated, one coming in, one going out): the recipe at TP 4 on 79 GiB (refused above) needs 50.4 GiB; auto picks
    it only where nothing else fits; a layout too large even so is refused with the first plan's numbers."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    free = 79 * GiB
    c = ModelConfig.named("llama2-13b")
    lm, score = c.num_params("lm", 4), c.num_params("score", 4)
    chunk = 3 * 12 * max(offload.CHUNK_ELEMENTS, 5120 * 32000 // 4)  # the embedding's quarter is the largest tensor
    need = 2 * (2 * lm + 2 * score) + 4 * (lm + score) + chunk
    line = memory_plan.plan(configs, torch.bfloat16, 4, 1, False, free, resident=True)
    assert line.startswith(f"memory plan: {need / GiB:.1f} GiB of 79.0") and f"{need / GiB:.1f}" == "50.4"
    assert "optimizer chunks in flight (the state in host memory) 2.2," in line
    auto, resident = memory_plan.plan_for("auto", configs, torch.bfloat16, 4, 1, False, free)
    assert resident and auto == line + " (--offload-optimizer auto: always, the only way this layout fits)"
    assert memory_plan.plan_for("auto", configs, torch.bfloat16, 8, 1, False, free)[1] is False  # TP 8 fits as is
    with pytest.raises(ValueError, match="need 120.5 GiB"):
        memory_plan.plan_for("off", configs, torch.bfloat16, 4, 1, False, free)
    with pytest.raises(ValueError, match=r"need 120\.5 GiB of 30\.0"):  # too small even with the state on the host
        memory_plan.plan_for("auto", configs, torch.bfloat16, 4, 1, False, 30 * GiB)
    state = 12 * (lm + score)  # a host that cannot hold 4 ranks' state is refused before anything is loaded
    assert memory_plan.plan_for("auto", configs, torch.bfloat16, 4, 1, False, free, host=2 * 4 * state, local_ranks=4)
    with pytest.raises(
        ValueError,
        match=r"--offload-optimizer auto: always, the only way this layout fits the GPUs\) needs "
        rf"{4 * state / GiB:.1f} GiB of host memory for 4 rank\(s\) on this node, 200\.0 available",
    ):
        memory_plan.plan_for("auto", configs, torch.bfloat16, 4, 1, False, free, host=200 * GiB, local_ranks=4)
    with pytest.raises(ValueError, match=r"\(--offload-optimizer rollouts\) needs"):
        memory_plan.plan_for("rollouts", configs, torch.bfloat16, 8, 1, False, free, host=100 * GiB, local_ranks=8)
    assert memory_plan.plan_for("off", configs, torch.bfloat16, 8, 1, False, free, host=GiB, local_ranks=8)[1] is False
    # --offload-idle-models rollouts: the reference's, value model's and reward model's bf16 weights, 8 ranks' of them,
    # in what the host has left beside the optimizer state
    lm8, score8 = c.num_params("lm", 8), c.num_params("score", 8)
    state8, idle8 = 12 * (lm8 + score8), 2 * (lm8 + 2 * score8)
    args = ("rollouts", configs, torch.bfloat16, 8, 1, False, free)
    host = 8 * state8 + 8 * idle8 / 0.9  # (HOST_LIMIT: 90% of what is available, once the state has its share)
    assert host > 8 * state8 / 0.9 + GiB  # (the idle models' check is the one that binds)
    memory_plan.plan_for(*args, host=int(host) + GiB, local_ranks=8, idle_models="rollouts")
    with pytest.raises(ValueError, match=r"the idle models' weights in host memory \(--offload-idle-models rollouts\)"):
        memory_plan.plan_for(*args, host=int(host) - GiB, local_ranks=8, idle_models="rollouts")
    memory_plan.plan_for(*args, host=int(host) - GiB, local_ranks=8, idle_models="auto")  # (decided after loading)
    # auto moves the state out for rollouts only where the host has room: without it (500 GiB for 8 ranks' 289 GiB,
    # more than half) a layout whose cache then holds nothing is refused here, not after loading four models
    seq = 2048
    reserve = memory_plan.generation_reserve(c, 8, seq, torch.bfloat16, 256)
    cache = dict(total=free, fraction=0.6, seq_len=seq, kv_dtype=torch.bfloat16, reserve=reserve)
    auto = ("auto", configs, torch.bfloat16, 8, 1, True, free, cache)
    with pytest.raises(ValueError, match=r"keep on the GPU \(the host has no room for the optimizer state\)"):
        memory_plan.plan_for(*auto, host=500 * GiB, local_ranks=8)
    assert memory_plan.plan_for(*auto, host=700 * GiB, local_ranks=8)[1] is False  # (room: moved during rollouts)
    assert memory_plan.plan_for(*auto)[1] is False  # (no host figure: as the runtime decides)


def _tokens(out: str, which: int = 0) -> int:
    """The rollout cache's tokens in a plan's line: the first figure (state on the GPU) or the second (offloaded)."""
    return int(out.split("GiB, ")[1 + which].split(" tokens")[0].replace(",", ""))


def test_command_line(capsys):
    """The recipe at TP 8 x DP 2 on 79 GiB GPUs, and what a rollout's KV cache gets: 0.9 of the memory less the
    weights and the optimizer state held then; a token takes 2 (K, V) x 40 layers x 5 heads x 128 x 2 bytes."""
    assert memory_plan.main(["--tp", "8", "--dp", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan: 42.")  # the optimizer state halved over 2 DP ranks
    c = ModelConfig.named("llama2-13b")
    lm, score = c.num_params("lm", 8), c.num_params("score", 8)
    # the generator's activations beside the cache: 8448 tokens of (4 x 5120 + 15 x 128 + 3 x 1728) bf16 values, and
    # 256 rows of 4000 logits in bf16 and fp32
    reserve = 8448 * (4 * 5120 + 15 * 128 + 3 * 1728) * 2 + 256 * 4000 * 6
    assert memory_plan.generation_reserve(c, 8, 2048, torch.bfloat16) == reserve
    held = 2 * (2 * lm + 2 * score) + 12 * (lm + score) // 2 + reserve
    assert _tokens(out) == (int(0.9 * 79 * GiB) - held) // (16 * 2 * 40 * 5 * 128 * 2) * 16  # (in blocks of 16)
    assert "(207 sequences of 2048)" in out
    weights = 2 * (2 * lm + 2 * score) + reserve  # with the optimizer state in host memory during rollouts
    # (at most what the generator's 256 slots fill at full length: it allocates no more)
    assert _tokens(out, 1) == min((int(0.9 * 79 * GiB) - weights) // (16 * 2 * 40 * 5 * 128 * 2) * 16, 256 * 2048)
    assert "(256 sequences of 2048)" in out
    assert f"--offload-optimizer rollouts, {12 * (lm + score) // 2 / GiB:.1f} GiB per GPU" in out
    assert memory_plan.main(["--tp", "8", "--dp", "2", "--kv-cache-dtype", "fp8", "--seq-len", "1024"]) == 0
    fp8 = capsys.readouterr().out
    assert (int(0.9 * 79 * GiB) - held) // (2 * 40 * 5 * 128) // 1024 == 830  # (what the memory would hold)
    assert _tokens(fp8) == 256 * 1024 and "(256 sequences of 1024)" in fp8  # (what the generator's slots fill)
    assert _tokens(fp8, 1) == min((int(0.9 * 79 * GiB) - weights) // (16 * 2 * 40 * 5 * 128) * 16, 256 * 1024)  # fp8
    assert memory_plan.main(["--tp", "2", "--gpu-gib", "141", "--offload-optimizer", "off"]) == 1
    assert "it would fit with --tp 4 or 4 data-parallel ranks of --tp 2 (8 GPUs) or --offload-optimizer always" in (
        capsys.readouterr().out
    )
    assert memory_plan.main(["--tp", "2", "--gpu-gib", "141"]) == 0  # auto: the state in host memory
    assert "(--offload-optimizer auto: always" in capsys.readouterr().out


def test_check_memory_refuses_before_loading(tmp_path, monkeypatch):
    """setup's check on a GPU reads only the checkpoints' config.json: too little free memory is refused by name."""
    save_hf_model(tmp_path / "policy")
    save_hf_model(tmp_path / "rm", head="score")
    run = RunConfig(policy=str(tmp_path / "policy"), reward=str(tmp_path / "rm"), dtype="bfloat16")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100_000, 10**9))
    with pytest.raises(ValueError, match=r"the models and optimizer state need .* of 0\.0 GiB free per GPU"):
        check_memory(PPOConfig(), run, ProcessGrid(), torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * GiB, 10 * GiB))
    check_memory(PPOConfig(), run, ProcessGrid(), torch.device("cuda", 0))
    missing = RunConfig(policy=str(tmp_path / "nowhere"), reward=str(tmp_path / "rm"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory .*nowhere does not exist"):
        check_memory(PPOConfig(), missing, ProcessGrid(), torch.device("cuda", 0))
    check_memory(PPOConfig(), run, ProcessGrid(), torch.device("cpu"))  # on CPU nothing is planned
    # a head size the GPU's attention kernels do not take: refused before loading, not at the first forward
    save_hf_model(tmp_path / "rm24", head="score", head_dim=24)
    odd = RunConfig(policy=str(tmp_path / "policy"), reward=str(tmp_path / "rm24"), dtype="bfloat16")
    with pytest.raises(ValueError, match="the value model's head dim 24 is not one the GPU's attention kernels take"):
        check_memory(PPOConfig(), odd, ProcessGrid(), torch.device("cuda", 0))
    check_memory(PPOConfig(), odd, ProcessGrid(), torch.device("cpu"))


def test_eval_only_plans_its_three_frozen_models(tmp_path, monkeypatch, capsys):
    """--eval-only's policy, reference and reward model, no optimizer: the recipe's three 13B models fit one 79 GiB GPU
    with no room left for a rollout's cache but 29 full-length sequences with the idle two in host memory; on 60 GiB
    they are refused naming --tp 2 (and no optimizer or data-parallel remedy); setup's check and the command line
    plan the same (before anything is loaded or fetched: setup_evaluation plans first)."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b", evaluation=True)
    assert sorted(configs) == ["policy", "reference", "reward"]
    c = ModelConfig.named("llama2-13b")
    need = 2 * (2 * c.num_params("lm") + c.num_params("score")) / GiB
    cache = {"total": 79 * GiB, "fraction": 0.9, "seq_len": 2048, "kv_dtype": torch.bfloat16}
    for setting in ("auto", "always", "rollouts"):  # (no optimizer state, whatever the flag says)
        line, resident = memory_plan.plan_for(setting, configs, torch.bfloat16, 1, 1, True, 79 * GiB, cache,
                                              idle_models="auto", evaluation=True)  # fmt: skip
        assert not resident and line.startswith(f"memory plan: {need:.1f} GiB of 79.0 GiB free per GPU") and need > 72
        assert "optimizer" not in line and "gradients" not in line, line
        assert "rollouts: a KV cache of 0.0 GiB, 0 tokens (0 sequences of 2048)" in line, line
        assert "in host memory: a KV cache of 46.9 GiB, 61,408 tokens (29 sequences of 2048)" in line, line
    # where the idle models cannot leave the GPU, a rollout would hold no sequence: refused before anything loads
    with pytest.raises(
        ValueError,
        match="would not hold one sequence of 2048 tokens with what --offload-optimizer off "
        "and --offload-idle-models off keep on the GPU: a larger --tp .*--offload-idle-models rollouts",
    ):
        memory_plan.plan_for("auto", configs, torch.bfloat16, 1, 1, True, 79 * GiB, cache, evaluation=True)
    with pytest.raises(ValueError, match="the host has no room for the idle models' weights"):
        memory_plan.plan_for("auto", configs, torch.bfloat16, 1, 1, True, 79 * GiB, cache, host=60 * GiB,
                             idle_models="auto", evaluation=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"^the models need 72\.4 GiB of 60\.0 GiB free per GPU \(weights \(policy\) "
                       r"24\.2, weights \(reference\) 24\.2, weights \(reward\) 23\.9\): .*it would fit with --tp 2 "
                       r"\(a larger --tp splits every model\)$"):  # fmt: skip
        memory_plan.plan_for("auto", configs, torch.bfloat16, 1, 4, True, 60 * GiB, evaluation=True)
    assert memory_plan.main(["--eval-only", "--tp", "1", "--gpu-gib", "60"]) == 1
    assert "the models need 72.4 GiB" in capsys.readouterr().out
    assert memory_plan.main(["--eval-only", "--tp", "2", "--gpu-gib", "60"]) == 0
    assert capsys.readouterr().out.startswith("memory plan: 36.2 GiB of 60.0 GiB")

    save_hf_model(tmp_path / "policy")
    save_hf_model(tmp_path / "rm", head="score")
    run = RunConfig(policy=str(tmp_path / "policy"), reward=str(tmp_path / "rm"), dtype="bfloat16")
    # setup's check of the 13B shapes' config.json (a tiny model's weights are far below the generator's activations)
    for name, head in (("policy-13b", "lm"), ("rm-13b", "score")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(ModelConfig.named("llama2-13b").to_hf(head)))
    big = RunConfig(policy=str(tmp_path / "policy-13b"), reward=str(tmp_path / "rm-13b"), dtype="bfloat16")
    weights = 2 * (2 * c.num_params("lm") + c.num_params("score"))  # (the 13B shapes')
    room = int(weights / memory_plan.FIXED_SHARE_LIMIT) + 4096  # the three models' weights, not a value model's
    monkeypatch.setattr(memory_plan, "host_available", lambda: 1000 * GiB)  # (the idle two in host memory)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (room, room + GiB))  # (1 GiB in use)
    check_memory(PPOConfig(), big, ProcessGrid(), torch.device("cuda", 0), evaluation=True)
    assert "optimizer" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"the models and optimizer state need"):  # (training needs more)
        check_memory(PPOConfig(), big, ProcessGrid(), torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (room - 8192, room + GiB))
    with pytest.raises(ValueError, match=r"^the models need "):
        check_memory(PPOConfig(), big, ProcessGrid(), torch.device("cuda", 0), evaluation=True)

    import engine.state as state_mod

    planned = []
    monkeypatch.setattr(state_mod, "check_memory", lambda *a, **k: planned.append(k) or False)
    monkeypatch.setattr(state_mod, "resolve_run", lambda *a, **k: pytest.fail("read before the plan"))
    from engine.tokenizer import TINY_EVAL_PROMPTS

    eval_run = RunConfig(policy=run.policy, reward=run.reward, eval_prompts=TINY_EVAL_PROMPTS, device="cpu")
    with pytest.raises(pytest.fail.Exception, match="read before the plan"):
        state_mod.setup_evaluation(PPOConfig(), eval_run, ProcessGrid())
    assert planned == [{"evaluation": True}]


def build_and_plan(device: torch.device):
    """Four models of a small shape in bf16 on `device`, the trained two's optimizers (masters and moments are
    allocated at construction), and the plan's weights and optimizer bytes for them."""
    from engine.config import PPOConfig
    from engine.optim import make_optimizer

    c = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_layers=3, num_heads=4, num_kv_heads=2)
    heads = {"policy": "lm", "reference": "lm", "value": "score", "reward": "score"}
    models = {k: Transformer(c, h, dtype=torch.bfloat16, device=device) for k, h in heads.items()}
    opts = [make_optimizer(models[k], PPOConfig()) for k in memory_plan.TRAINED]
    parts = memory_plan.fixed_bytes({k: c.num_params(h) for k, h in heads.items()}, memory_plan.TRAINED,
                                    torch.bfloat16, 1, False)  # fmt: skip
    planned = sum(v for k, v in parts.items() if k != "fp32 gradients")
    return models, opts, planned


def test_plan_counts_what_models_and_optimizers_allocate():
    """Every byte of the weights, fp32 masters and Adam moments built (CPU: the tensors' own bytes)."""
    models, opts, planned = build_and_plan(torch.device("cpu"))
    tensors = [p for m in models.values() for p in m.parameters()]
    tensors += [t for o in opts for t in o.masters]
    tensors += [t for o in opts for st in o.adam.state.values() for t in st.values() if t.numel() > 1]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(storages.values()) == planned


def test_command_line_reads_configs_of_directories_and_hub_ids(tmp_path, monkeypatch, capsys):
    """A checkpoint directory's config.json, or a Hub id's alone (fetched, not the weights)."""
    import huggingface_hub

    from engine.config import MODEL_SHAPES

    save_hf_model(tmp_path / "rm", head="score")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub/config.json").write_text(json.dumps(MODEL_SHAPES["llama2-7b"].to_hf("lm")))
    fetched = []

    def hf_hub_download(repo, filename, revision=None, local_files_only=False):
        fetched.append((repo, filename, revision))
        return str(tmp_path / "hub" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    argv = ["--policy", "org/llama@v2", "--reward", str(tmp_path / "rm"), "--tp", "1", "--gpu-gib", "400"]
    with pytest.raises(SystemExit):  # (the small reward model's context: 256 tokens)
        memory_plan.main(argv)
    err = capsys.readouterr().err  # (not given: its default named as such, and what to do)
    assert "--seq-len's default, 2048 (the recipe's), is longer than the value model's context (256 tokens" in err
    assert err.rstrip().endswith("give the --seq-len its run will use")
    fetched.clear()
    argv += ["--seq-len", "256"]
    assert memory_plan.main(argv) == 0
    assert fetched == [("org/llama", "config.json", "v2")]
    c7 = ModelConfig.named("llama2-7b")
    assert f"weights (policy) {c7.num_params('lm') * 2 / GiB:.1f}," in capsys.readouterr().out
    with pytest.raises(SystemExit):
        memory_plan.main(["--policy", str(tmp_path / "missing/dir/x")])


def test_the_plan_leaves_auto_the_host_memory_an_explicit_idle_offload_does_not_need():
    """The recipe at TP 8 on 64 GiB GPUs (a 0.6 cache fraction), 8 ranks on a node with 620 GiB of host memory: room
    for the optimizer state (289 GiB, auto's half) or the idle models' weights as --offload-idle-models rollouts asks,
    not both. decide_offload then keeps the state on the GPU, where a rollout's cache cannot hold one sequence: the
    plan refuses it now, naming the host's room (it assumed the state moved and let the run load); 700 GiB fit both."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    gpu = 64 * GiB
    reserve = memory_plan.generation_reserve(configs["policy"][0], 8, 2048, torch.bfloat16, 256)
    cache = {"total": gpu, "fraction": 0.6, "seq_len": 2048, "kv_dtype": torch.bfloat16, "reserve": reserve,
             "max_num_seqs": 256}  # fmt: skip

    def plan(host, idle="rollouts"):
        return memory_plan.plan_for("auto", configs, torch.bfloat16, 8, 1, True, gpu, cache, host=round(host * GiB),
                                    local_ranks=8, idle_models=idle)  # fmt: skip

    with pytest.raises(ValueError, match=r"would not hold one sequence .* \(the host has no room for the optimizer "):
        plan(620)
    assert plan(700)[1] is False and plan(620, idle="off")[1] is False  # (state moved for rollouts: not resident)
    assert plan(620, idle="auto")[1] is False  # (auto and auto: the optimizer state first, as decide_offload does)
    # the bound, to the byte: the state moves while 8 ranks' of it are at most half of what the idle weights leave
    lm8, score8 = configs["policy"][0].num_params("lm", 8), configs["policy"][0].num_params("score", 8)
    exact = 2 * 8 * 12 * (lm8 + score8) + 8 * 2 * (lm8 + 2 * score8)  # (the state's fp32 bytes, the idle bf16 weights)
    assert plan(exact / GiB)[1] is False
    with pytest.raises(ValueError, match=r"\(the host has no room for the optimizer state\)"):
        plan((exact - 1) / GiB)


def test_offload_decision():
    """--offload-optimizer: auto offloads around rollouts on a GPU only when the rollout cache would otherwise hold
    fewer sequences than the generator decodes together and the node's ranks' state takes at most half the
    available host memory; rollouts refuses a host without room by name; on CPU nothing moves unless asked."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    state, host = 36 * GiB, 1024 * GiB
    decide = memory_plan.offload_decision
    on, line = decide("auto", cuda, state, 8, (117, 302), 256, host)
    assert on and "36.0 GiB per GPU in host memory during rollouts" in line and "holds 302 instead of 117" in line
    assert "288.0 GiB of host memory for 8 rank(s)" in line
    on, line = decide("auto", cuda, state, 8, (300, 500), 256, host)  # the cache holds max_num_seqs already
    assert not on and "holds 300 sequences" in line
    assert decide("auto", cuda, state, 8, (117, 302), 64, host)[0] is False  # a rank's rollout of 64 fits
    on, line = decide("auto", cuda, state, 8, (117, 302), 256, 500 * GiB)  # 288 GiB > half of 500
    assert not on and "would take 288.0 GiB of host memory" in line
    assert decide("rollouts", cuda, state, 8, (300, 500), 256, 500 * GiB)[0]  # asked for: below 90% of the host
    # always: the state is in host memory already when this is decided (plan_for checked the room before loading)
    on, line = decide("always", cuda, state, 8, (0, 0), 256, 10 * GiB)
    assert on and "36.0 GiB per GPU in host memory, updated in chunks" in line
    with pytest.raises(ValueError, match=r"--offload-optimizer rollouts\) needs 288\.0 GiB of host memory for 8 "
                       r"rank\(s\) on this node, 300\.0 available"):  # fmt: skip
        decide("rollouts", cuda, state, 8, (117, 302), 256, 300 * GiB)
    # the way out it names shrinks the state: more data-parallel ranks only where the optimizer is sharded over them
    # (--no-distributed-optimizer was told to add ranks, which changes nothing per rank); always can be turned off
    with pytest.raises(ValueError, match=r"a larger --tp or more data-parallel ranks \(the distributed optimizer "
                       r"shards the state\), or --offload-optimizer off$"):  # fmt: skip
        decide("rollouts", cuda, state, 8, (117, 302), 256, 300 * GiB)
    with pytest.raises(ValueError, match=r"a larger --tp or --distributed-optimizer with data-parallel ranks \(it "
                       r"shards the state over them\), or --offload-optimizer off$"):  # fmt: skip
        decide("rollouts", cuda, state, 8, (117, 302), 256, 300 * GiB, distributed=False)
    with pytest.raises(ValueError, match=r"\(--offload-optimizer always\) needs .* or --offload-optimizer off$"):
        memory_plan.check_host_room(state, 8, 300 * GiB, "always")
    with pytest.raises(ValueError, match=r"the idle models' weights in host memory .* a larger --tp$"):
        memory_plan.check_host_room(state, 8, 300 * GiB, "auto", "idle models' weights", "--offload-idle-models")
    assert not decide("off", cuda, state, 8, (117, 302), 256, host)[0]
    on, line = decide("auto", cuda, state, 8, (117, 117), 256, host)  # a fixed cache (--kv-cache-mb): no gain
    assert not on and "would not enlarge the KV cache" in line
    assert not decide("auto", cpu, state, 1, (0, 0), 256, host)[0]
    assert decide("rollouts", cpu, state, 1, (0, 0), 256, host)[0]
    with pytest.raises(ValueError, match="must be one of auto, off, rollouts, always, got 'on'"):
        decide("on", cuda, state, 8, (117, 302), 256, host)
    # --offload-idle-models: the same rules, its own name in the line and the refusal
    models = ("idle models' weights", "--offload-idle-models")
    on, line = decide("auto", cuda, 9 * GiB, 8, (302, 348), 512, host, *models)
    assert on and line.startswith("idle models' weights: 9.0 GiB per GPU in host memory during rollouts (the rollo")
    with pytest.raises(ValueError, match=r"the idle models' weights in host memory \(--offload-idle-models rollouts\)"):
        decide("rollouts", cuda, 9 * GiB, 8, (302, 348), 256, 50 * GiB, *models)


def test_host_memory_available_is_capped_by_the_cgroup(monkeypatch, tmp_path):
    """A limit on this process's cgroup or one above it (less its use, its inactive page cache not counted as used)
    caps what /proc/meminfo says is available; no limit leaves it (cgroup v2, and v1's memory controller)."""
    import builtins

    files = {"/proc/meminfo": "MemTotal: 100 kB\nMemAvailable:  1048576 kB\n"}  # 1 GiB
    real_open = builtins.open

    def fake_open(path, *a, **kw):
        if str(path) in files:
            copy = tmp_path / str(path).replace("/", "_")
            copy.write_text(files[str(path)])
            return real_open(copy, *a, **kw)
        if str(path).startswith(("/sys/fs/cgroup", "/proc/self/cgroup")):
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert memory_plan.host_available() == GiB  # no cgroup information
    files["/proc/self/cgroup"] = "0::/job/step\n"
    files.update({"/sys/fs/cgroup/job/step/memory.max": "max\n", "/sys/fs/cgroup/job/step/memory.current": "5\n"})
    assert memory_plan.host_available() == GiB  # no limit on the way up
    files.update(
        {
            "/sys/fs/cgroup/job/memory.max": f"{GiB // 2}\n",
            "/sys/fs/cgroup/job/memory.current": f"{GiB // 4}\n",
            "/sys/fs/cgroup/job/memory.stat": f"anon 1\ninactive_file {GiB // 8}\nactive_file 3\n",
        }
    )
    assert memory_plan.host_available() == GiB // 2 - GiB // 4 + GiB // 8  # the job's, a level above the step
    files["/sys/fs/cgroup/job/step/memory.max"] = f"{GiB // 4}\n"  # a tighter limit on the step itself
    assert memory_plan.host_available() == GiB // 4 - 5
    files.clear()
    files["/proc/meminfo"] = "MemAvailable:  1048576 kB\n"
    files["/proc/self/cgroup"] = "12:cpu,cpuacct:/a\n9:memory:/slurm/uid_0/job_7\n"
    files.update({"/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.limit_in_bytes": f"{GiB // 2}\n",
                  "/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.usage_in_bytes": f"{GiB // 8}\n",
                  "/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.stat": f"total_inactive_file {GiB // 8}\n",
                  "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
                  "/sys/fs/cgroup/memory/memory.usage_in_bytes": "1\n"})  # fmt: skip
    assert memory_plan.host_available() == GiB // 2


def test_command_line_refuses_impossible_numbers(tmp_path, capsys):
    for flags, message in (
        (["--kv-cache-fraction", "5"], r"--kv-cache-fraction must be in \(0, 1\], got 5.0"),
        (["--gpu-gib", "-5"], "--gpu-gib must be a positive number, got -5.0"),
        (["--gpu-gib", "0"], "--gpu-gib must be a positive number, got 0.0"),
    ):
        with pytest.raises(SystemExit):
            memory_plan.main(flags)
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:  # (a usage error: on stderr, exit 2, as train_ppo's)
        memory_plan.main(["--policy", str(tmp_path)])
    assert e.value.code == 2 and f"no config.json at {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        memory_plan.main(["--policy", "tiny", "--reward", "tiny", "--tp", "1", "--seq-len", "9000"])
    assert "--seq-len 9000 is longer than the policy model's context (" in capsys.readouterr().err


def test_a_small_states_chunks_and_the_host_advice():
    """--offload-optimizer always holds three chunks of the state on the device, never more than the whole state (a
    small model's is its tensors: the plan charged 2.2 GiB for a state of a few MiB); a host without room for the idle
    models' weights names the setting that needs none."""
    configs = memory_plan.run_configs("tiny", None, "tiny")
    numels = {k: c.num_params(head, 1) for k, (c, head) in configs.items()}
    args = (numels, memory_plan.TRAINED, torch.bfloat16, 1, False)
    state = memory_plan.fixed_bytes(*args)[memory_plan.STATE]
    assert 0 < memory_plan.fixed_bytes(*args, offload.CHUNK_ELEMENTS)[memory_plan.CHUNKS] == state < 2**30
    big = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    with pytest.raises(ValueError, match=r"a larger --tp, or --offload-idle-models off$"):
        memory_plan.plan_for("off", big, torch.bfloat16, 8, 1, False, 79 * GiB, host=GiB, local_ranks=8,
                             idle_models="rollouts")  # fmt: skip


def test_a_suggested_tp_degree_divides_the_models():
    """llama2-13b at --tp 8 that does not fit, with memory enough for --tp 16: 16 does not divide its 40 heads, so
    the refusal does not suggest it."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    numels = {k: c.num_params(head, 16) for k, (c, head) in configs.items()}
    need16 = sum(memory_plan.fixed_bytes(numels, memory_plan.TRAINED, torch.bfloat16, 1, True).values())
    free = int(need16 / memory_plan.FIXED_SHARE_LIMIT * 1.01)
    with pytest.raises(ValueError) as e:
        memory_plan.plan(configs, torch.bfloat16, 8, 1, True, free)
    assert "--tp" in str(e.value) and "--tp 16" not in str(e.value), str(e.value)


def test_a_suggested_tp_degree_leaves_every_rank_some_vocabulary():
    """A degree that divides the heads and MLP but would leave a rank none of a small vocabulary (6 rows at --tp 4:
    2 rows each, the last rank none) is not suggested: check_tp refuses it when it is given."""
    c = ModelConfig(vocab_size=6, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=16, num_kv_heads=16)
    configs = {"policy": (c, "lm"), "reference": (c, "lm"), "value": (c, "score"), "reward": (c, "score")}
    numels = {k: m.num_params(head, 4) for k, (m, head) in configs.items()}
    need4 = sum(memory_plan.fixed_bytes(numels, memory_plan.TRAINED, torch.bfloat16, 1, True).values())
    free = int(need4 / memory_plan.FIXED_SHARE_LIMIT * 1.01)
    with pytest.raises(ValueError, match="tensor parallel degree 4 leaves a rank none of"):
        memory_plan.check_tp(configs, 4)
    with pytest.raises(ValueError) as e:
        memory_plan.plan(configs, torch.bfloat16, 2, 1, True, free)
    assert "need" in str(e.value) and "--tp 4" not in str(e.value), str(e.value)


def test_rollout_cache_counts_the_memory_in_use_before_loading():
    """A rollout's KV cache gets `fraction` of the GPU's total memory less all that is in use then
    (engine.kv_cache.cuda_cache_budget): the CUDA context and any other process's memory too, which the plan sees as
    total - free before anything is loaded, beside the weights and the optimizer state."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    c = ModelConfig.named("llama2-13b")
    lm, score = c.num_params("lm", 8), c.num_params("score", 8)
    weights, state, per_token = 2 * (2 * lm + 2 * score), 12 * (lm + score), 2 * 40 * 5 * 128 * 2
    total, free = 80 * GiB, 79 * GiB  # (1 GiB in use: the context, another process)
    cache = dict(total=total, fraction=0.9, seq_len=2048, kv_dtype=torch.bfloat16, reserve=0)
    line = memory_plan.plan(configs, torch.bfloat16, 8, 1, False, free, cache)
    assert _tokens(line) == (int(0.9 * total) - (total - free) - weights - state) // (16 * per_token) * 16
    # the policy's weights and one sequence fit the fraction with half a GiB to spare, the GiB in use does not
    cache["fraction"] = (2 * lm + 2048 * per_token + GiB // 2) / total
    with pytest.raises(ValueError, match="would not hold one sequence of 2048 tokens, even with every other model"):
        memory_plan.plan(configs, torch.bfloat16, 8, 1, False, free, cache)
    cache["fraction"] = (weights + 2048 * per_token + GiB // 2) / total  # (the four models' weights, likewise)
    with pytest.raises(ValueError, match="would not hold one sequence of 2048 tokens with what --offload-optimizer"):
        memory_plan.plan_for("rollouts", configs, torch.bfloat16, 8, 1, False, free, cache)


def test_a_fixed_kv_cache_is_planned_as_the_generator_takes_it():
    """--kv-cache-mb: the plan's cache is that budget whatever memory is held (the fraction does not size it, offloading
    does not enlarge it, and auto offloads nothing for it, as engine.state.decide_offload decides), refused where it
    would not fit beside what a rollout holds (the generator's allocation would run out of memory after four models
    had loaded), and a budget the fraction's cache would not allow but the GPU holds is taken (it was refused)."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    c = ModelConfig.named("llama2-13b")
    lm, score = c.num_params("lm", 8), c.num_params("score", 8)
    weights, state, per_token = 2 * (2 * lm + 2 * score), 12 * (lm + score), 2 * 40 * 5 * 128 * 2
    total = free = 80 * GiB
    cache = dict(total=total, fraction=0.5, seq_len=2048, kv_dtype=torch.bfloat16, reserve=0, fixed=4 * GiB)
    line = memory_plan.plan_for("auto", configs, torch.bfloat16, 8, 1, False, free, cache, host=10**15)[0]
    fixed = f"a KV cache of 4.0 GiB (--kv-cache-mb), {4 * GiB // (16 * per_token) * 16:,} tokens"
    assert line.count(fixed) == 3, line  # (held: everything; the optimizer state offloaded; the idle models' too)
    assert memory_plan.cache_tokens(c, 8, weights + state, **{**cache, "fixed": 0})[1] < 2048  # (the fraction's)
    room = total - weights - state  # (a rollout's: the four models' weights and the optimizer state, auto moving none)
    cache["fixed"] = room + 16 * per_token
    with pytest.raises(ValueError, match="would not hold one sequence .* or another --kv-cache-mb"):
        memory_plan.plan_for("auto", configs, torch.bfloat16, 8, 1, False, free, cache, host=10**15)
    line = memory_plan.plan_for("rollouts", configs, torch.bfloat16, 8, 1, False, free, cache, host=10**15)[0]
    size = f"{cache['fixed'] / GiB:.1f} GiB"  # (not beside the optimizer state; with it in host memory, whole)
    assert f"; rollouts: no room for --kv-cache-mb's {size} of KV cache" in line
    assert f"GiB per GPU): a KV cache of {size} (--kv-cache-mb), " in line


def test_rollout_cache_is_counted_as_the_generator_allocates_it():
    """The plan's cache is what engine.generate.Generator allocates from the same budget: whole blocks of 16 tokens,
    at most max_num_seqs sequences each in whole blocks. A --seq-len that is not a multiple of 16 takes a partly
    filled last block per sequence; a budget short of a whole block gets none of it."""
    from engine.generate import Generator

    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, max_position_embeddings=256), dtype=torch.float32)  # fmt: skip
    per_block = 16 * 2 * 2 * 2 * 8 * 4  # tokens x layers x (K, V) x heads x head dim x fp32
    for seq_len, max_num_seqs, budget in [(100, 3, 10**6), (100, 3, 10 * per_block + per_block // 2), (40, 64, 10**6)]:
        gen = Generator(model, max_num_seqs=max_num_seqs, max_model_len=seq_len, kv_cache_bytes=budget)
        blocks = gen._local_num_blocks()
        assert memory_plan.cache_tokens(
            model.config, 1, 0, budget, 1.0, seq_len, torch.float32, max_num_seqs=max_num_seqs
        ) == (blocks * per_block, blocks * 16), (seq_len, max_num_seqs, budget)
    assert blocks == 64 * 3 and Generator(model, max_model_len=100, kv_cache_bytes=10**6)._local_num_blocks() == 244
    # the sequences the line names are whole ones in whole blocks: the generator's 3 slots of 100 tokens (7 blocks)
    line = memory_plan.rollout_cache(model.config, 1, 0, 10**6, 1.0, 100, torch.float32, max_num_seqs=3)
    assert line.endswith("336 tokens (3 sequences of 100)"), line


def test_command_line_help_names_the_recipes_defaults(capsys):
    """A --policy given alone is planned beside the recipe's 13B reward model at TP 8: --help says so (a user planning
    their own checkpoint otherwise reads a refusal of "--tp 8" they never typed, or a 13B value model they never
    named)."""
    with pytest.raises(SystemExit):
        memory_plan.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a Hub id (default: llama2-13b)" in out and "its shape (default: llama2-13b)" in out
    assert "--tp TP tensor parallel degree (default: 8)" in out


def test_a_tp_degree_must_divide_the_mlp_too_and_leave_every_rank_some_vocabulary():
    """check_tp names every size a TP degree must divide, not the heads alone: the MLP's width, of each model; a
    vocabulary it does not divide is padded (Llama 2 with an added pad token: 32001 at --tp 8), unless a rank would
    hold none of it; --tp 0 divides nothing (refused, not a ZeroDivisionError)."""
    c = ModelConfig(vocab_size=1001, hidden_size=256, intermediate_size=690, num_layers=1, num_heads=8, num_kv_heads=4)
    memory_plan.check_tp({"policy": (c, "lm")}, 2)  # (690 is even)
    memory_plan.check_tp(
        {"policy": (dataclasses.replace(c, vocab_size=32001, num_kv_heads=8, intermediate_size=13824), "lm")}, 8
    )
    tiny = dataclasses.replace(c, vocab_size=5, intermediate_size=688)  # 2 rows a rank: the fourth holds none
    with pytest.raises(ValueError, match=r"degree 4 leaves a rank none of the reward model's vocabulary \(5\)"):
        memory_plan.check_tp({"reward": (tiny, "score")}, 4)
    memory_plan.check_tp({"reward": (dataclasses.replace(tiny, vocab_size=7), "score")}, 4)  # 2, 2, 2 and 1
    from engine.parallel import shard_range

    with pytest.raises(ValueError, match="tensor parallel degree 0 must be at least 1"):
        shard_range(7, 0, 0)
    with pytest.raises(ValueError, match=r"degree 4 leaves a rank none of the vocabulary \(6\)"):
        shard_range(6, 4, 0)  # (2 rows a rank: the fourth's start at 6, past the last)
    lm = dataclasses.replace(c, intermediate_size=688)
    with pytest.raises(ValueError, match=r"--tp 4 does not divide the reward model's MLP width \(690\)"):
        memory_plan.check_tp({"policy": (lm, "lm"), "reward": (c, "score")}, 4)
    with pytest.raises(ValueError, match=r"--tp 0 does not divide the policy model's attention heads \(8\)"):
        memory_plan.check_tp({"policy": (lm, "lm")}, 0)


def test_a_cgroup_over_its_limit_leaves_no_host_memory(monkeypatch):
    """A cgroup using more than its limit less its page cache leaves none: 0 bytes available, never a negative
    number (which the offload checks would compare and print)."""
    monkeypatch.setattr(memory_plan, "_cgroup_room", lambda: -5 * GiB)
    assert memory_plan.host_available() == 0
    monkeypatch.setattr(memory_plan, "_cgroup_room", lambda: 5)
    assert memory_plan.host_available() == 5


def test_auto_keeps_the_state_on_the_gpu_when_the_cache_holds_exactly_what_is_wanted():
    """A rollout's cache that holds as many full-length sequences as the generator decodes together gains nothing
    from offloading: auto leaves the optimizer state (and the idle models) on the GPU at equality too."""
    cuda = torch.device("cuda", 0)
    on, line = memory_plan.offload_decision("auto", cuda, 36 * GiB, 8, (256, 302), 256, 1024 * GiB)
    assert not on and "holds 256 sequences" in line
    assert memory_plan.offload_decision("auto", cuda, 36 * GiB, 8, (255, 302), 256, 1024 * GiB)[0]


def test_the_fixed_share_is_95_percent_of_the_free_memory():
    """A layout whose weights, optimizer state and grads take 97% of the free memory is refused (the rest goes to the
    CUDA context, NCCL's buffers and fragmentation, before any KV cache); 95% fits."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    numels = {k: c.num_params(head, 8) for k, (c, head) in configs.items()}
    need = sum(memory_plan.fixed_bytes(numels, memory_plan.TRAINED, torch.bfloat16, 1, False).values())
    with pytest.raises(ValueError, match=r"more than 95% of the free memory"):
        memory_plan.plan(configs, torch.bfloat16, 8, 1, False, int(need / 0.97))
    assert memory_plan.plan(configs, torch.bfloat16, 8, 1, False, int(need / 0.95) + 1).startswith("memory plan: ")


def test_the_host_check_counts_a_ranks_shard_of_the_distributed_optimizer():
    """--offload-optimizer rollouts on 8 ranks of a node, 2 data-parallel ranks with the distributed optimizer: each
    rank puts its half of the state in host memory, and the host is checked against 8 halves."""
    configs = memory_plan.run_configs("llama2-13b", None, "llama2-13b")
    c = ModelConfig.named("llama2-13b")
    half = 12 * (c.num_params("lm", 8) + c.num_params("score", 8)) // 2
    args = ("rollouts", configs, torch.bfloat16, 8, 2, True, 79 * GiB)
    memory_plan.plan_for(*args, host=int(8 * half / memory_plan.HOST_LIMIT) + GiB, local_ranks=8)
    with pytest.raises(ValueError, match=rf"\(--offload-optimizer rollouts\) needs {8 * half / GiB:.1f} GiB"):
        memory_plan.plan_for(*args, host=int(8 * half / memory_plan.HOST_LIMIT) - GiB, local_ranks=8)


def test_command_line_fp8_cache_reference_and_fraction_one(capsys):
    """--kv-cache-dtype fp8 halves a token's bytes where the generator's slots do not cap the cache first; --reference
    plans a model of its own shape; --kv-cache-fraction 1 (the whole GPU) is allowed."""
    c = ModelConfig.named("llama2-13b")
    lm, score = c.num_params("lm", 8), c.num_params("score", 8)
    reserve = memory_plan.generation_reserve(c, 8, 1024, torch.bfloat16, 4096)
    held = 2 * (2 * lm + 2 * score) + 12 * (lm + score) // 2 + reserve
    argv = ["--tp", "8", "--dp", "2", "--seq-len", "1024", "--max-num-seqs", "4096"]
    assert memory_plan.main([*argv, "--kv-cache-dtype", "fp8"]) == 0
    assert _tokens(capsys.readouterr().out) == (int(0.9 * 79 * GiB) - held) // (16 * 2 * 40 * 5 * 128) * 16
    assert memory_plan.main(argv) == 0
    assert _tokens(capsys.readouterr().out) == (int(0.9 * 79 * GiB) - held) // (16 * 2 * 40 * 5 * 128 * 2) * 16
    c7 = ModelConfig.named("llama2-7b")
    assert memory_plan.run_configs("llama2-13b", "llama2-7b", "llama2-13b")["reference"] == (c7, "lm")
    assert memory_plan.main(["--reference", "llama2-7b"]) == 0
    assert f"weights (reference) {c7.num_params('lm', 8) * 2 / GiB:.1f}," in capsys.readouterr().out
    assert memory_plan.main(["--kv-cache-fraction", "1"]) == 0


def test_command_line_refuses_a_checkpoint_of_the_wrong_kind(tmp_path, capsys):
    """A causal LM given as --reward (or a reward model as --policy) is refused from its weight files' headers, as
    train_ppo.py refuses it; it was planned with a score head it does not have. A directory holding only a
    config.json (a shape to plan) is still planned."""
    save_hf_model(tmp_path / "lm", "lm")
    save_hf_model(tmp_path / "rm", "score")
    lm, rm = str(tmp_path / "lm"), str(tmp_path / "rm")
    common = ["--tp", "1", "--gpu-gib", "10", "--seq-len", "64"]
    assert memory_plan.main(["--policy", lm, "--reward", rm, *common]) == 0
    for flags, role in (
        (["--policy", lm, "--reward", lm], "reward"),
        (["--policy", rm, "--reward", rm], "policy"),
        (["--policy", lm, "--reference", rm, "--reward", rm], "reference"),
    ):
        with pytest.raises(SystemExit) as e:
            memory_plan.main([*flags, *common])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--{role}: checkpoint {lm if role == 'reward' else rm} is missing tensor" in err
        assert " checkpoint: this model is" in err
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tmp_path / "lm" / "config.json").read_text())
    assert memory_plan.main(["--policy", lm, "--reward", str(config_only), *common]) == 0


def test_a_padded_vocabulary_is_counted_as_a_rank_holds_it(monkeypatch):
    """A vocabulary the TP degree does not divide (Llama 2 with an added pad token: 32001) is padded to a multiple of
    it (engine.parallel.shard_rows): the parameters a rank holds, the logits rows the generator's reserve keeps for
    it and the chunk an optimizer update in host memory moves count its padded shard, not vocab_size // tp."""
    fake_tp(monkeypatch)
    tiny = dataclasses.replace(ModelConfig.named("tiny"), vocab_size=509)  # (255 rows a rank, the last one padding)
    for head in ("lm", "score"):
        ours = Transformer(tiny, head, group=FakeGroup(2, 1), dtype=torch.bfloat16, device="meta")
        assert tiny.num_params(head, 2) == sum(p.numel() for p in ours.parameters()), head
    c = dataclasses.replace(ModelConfig.named("llama2-13b"), vocab_size=32001)
    reserve = 8448 * (4 * 5120 + 15 * 128 + 3 * 1728) * 2 + 256 * 4001 * 6  # (4001 rows of logits a rank)
    assert memory_plan.generation_reserve(c, 8, 2048, torch.bfloat16) == reserve
    chunks = []
    real = memory_plan.fixed_bytes
    monkeypatch.setattr(memory_plan, "fixed_bytes", lambda *a: chunks.append(a[-1]) or real(*a))
    big = dataclasses.replace(c, vocab_size=2**26 // 5120 * 8 + 1)  # 13108 rows a rank: more than CHUNK_ELEMENTS
    memory_plan.plan({"policy": (big, "lm")}, torch.bfloat16, 8, 1, False, 1000 * GiB, resident=True)
    assert chunks == [5120 * 13108]


def test_a_suggested_tp_degree_need_not_divide_the_vocabulary():
    """Llama 2 7B with an added pad token (32001) at --tp 4 does not fit 60 GiB GPUs, at --tp 8 it does: the refusal
    suggests --tp 8 (its vocabulary is padded), as it would for 32000."""
    c = dataclasses.replace(ModelConfig.named("llama2-7b"), vocab_size=32001)
    configs = {"policy": (c, "lm"), "reference": (c, "lm"), "value": (c, "score"), "reward": (c, "score")}
    with pytest.raises(ValueError, match="it would fit with --tp 8"):
        memory_plan.plan(configs, torch.bfloat16, 4, 1, False, 60 * GiB)


def test_rollout_cache_names_the_whole_sequences_its_blocks_hold():
    """rollout_cache's sequences are those its whole blocks hold: 13 blocks of 16 tokens (208 tokens) hold one
    sequence of 100 tokens in 7 blocks, not two of 100 tokens."""
    model = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    per_block = 16 * 2 * 2 * 2 * 8 * 4  # tokens x layers x (K, V) x heads x head dim x fp32
    line = memory_plan.rollout_cache(model, 1, 0, 13 * per_block, 1.0, 100, torch.float32)
    assert line.endswith("208 tokens (1 sequences of 100)"), line


def test_a_refused_tp_degree_names_every_degree_that_divides_down_to_one(tmp_path, capsys):
    """The CLI's refusal of a --tp names the degrees that do lay the models out: up to 16 (Llama 2 7B's 32 key/value
    heads), or 1 alone (odd heads), without a dangling "or"."""
    with pytest.raises(SystemExit) as e:
        memory_plan.main(["--policy", "llama2-7b", "--reward", "llama2-7b", "--tp", "3"])
    assert e.value.code == 2 and "; --tp 1, 2, 4, 8 or 16 divides them\n" in capsys.readouterr().err
    odd = dataclasses.replace(ModelConfig.named("tiny"), hidden_size=96, num_heads=3, num_kv_heads=1)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps(odd.to_hf("lm")))
    with pytest.raises(SystemExit) as e:
        memory_plan.main(["--policy", str(tmp_path / "odd"), "--reward", str(tmp_path / "odd"), "--tp", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.endswith("model's attention heads (3); --tp 1 divides them\n"), err
