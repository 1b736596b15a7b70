"""A test-only sampler with engine.generate.Generator's interface, and the torchrun worker of the DP test.

NaiveGenerator recomputes the whole sequence every step (no KV cache): slow but obviously right, and
each sequence draws from its own torch.Generator seeded by its prompt tokens, sample index, seed key and the
call's seed (the trainer's iteration), so its samples do not depend on which other prompts share the batch (or
the DP rank), nor on whether the run was resumed.

Worker: python -m torch.distributed.run --nproc_per_node 2 tests/engine/ppo_dp_worker.py OUT_DIR [flags]
runs engine.train_ppo.cli (tiny default) with NaiveGenerator and writes OUT_DIR/result-rank{r}.pt.
"""

from __future__ import annotations

import os
import sys
import zlib

import torch

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from engine.scheduler import Completion  # noqa: E402


class NaiveGenerator:
    def __init__(self, model, *args, **kwargs):
        self.model = model

    def release(self) -> None:
        pass

    @torch.no_grad()
    def generate_completions(self, prompts: list[list[int]], params, seed_keys=None) -> list[Completion]:
        seqs, gens, comps = [], [], []
        for i, p in enumerate(prompts):
            for s in range(params.n):
                key = zlib.crc32(repr((p, s, params.seed, seed_keys and seed_keys[i])).encode())
                gens.append(torch.Generator().manual_seed(key))
                seqs.append(list(p))
                comps.append(Completion(i, s, [], [], "length"))
        live = list(range(len(seqs)))
        dev = next(self.model.parameters()).device
        for _ in range(params.max_new_tokens):
            if not live:
                break
            lens = [len(seqs[j]) for j in live]
            ids = torch.tensor([t for j in live for t in seqs[j]], device=dev)
            pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
            cu = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
            logits = self.model.forward_packed(ids, pos, cu)[cu[1:].long() - 1].float()
            logp = torch.log_softmax(logits, -1).cpu()
            probs = torch.softmax(logits / params.temperature, -1).cpu()
            still = []
            for k, j in enumerate(live):
                tok = int(torch.multinomial(probs[k], 1, generator=gens[j]))
                seqs[j].append(tok)
                comps[j].tokens.append(tok)
                comps[j].logprobs.append(float(logp[k, tok]))
                if tok in params.stop_token_ids:
                    comps[j].finish_reason = "stop"
                else:
                    still.append(j)
            live = still
        return comps


def naive_factory(policy, cfg, run):
    return NaiveGenerator(policy)


if __name__ == "__main__":
    import torch.distributed as dist

    from engine.train_ppo import cli

    out = sys.argv[1]
    history = []
    holder = {}

    def factory(policy, cfg, run):
        holder["policy"] = policy
        gen = NaiveGenerator(policy)
        slow = os.environ.get("TEST_SLOW_ROLLOUT")  # "RANK:SECONDS": that rank's rollouts take that much longer
        if slow and int(slow.split(":")[0]) == int(os.environ.get("RANK", "0")):
            import time

            real = gen.generate_completions

            def generate_completions(*a, **k):
                time.sleep(float(slow.split(":")[1]))
                return real(*a, **k)

            gen.generate_completions = generate_completions
        return gen

    # main() destroys the process group on exit; read the rank first.
    rank = int(os.environ.get("RANK", "0"))
    nan = os.environ.get("TEST_NAN_SCORES")  # "RANK:MODULE": that rank's reward model scores NaN in trainer or evaluate
    if nan and int(nan.split(":")[0]) == rank:
        import importlib

        module = importlib.import_module(f"engine.{nan.split(':')[1]}")
        real_forward = module.forward_rollout

        def forward_rollout(state, ro, **kw):
            real_forward(state, ro, **kw)
            ro.scores[0] = float("nan")

        module.forward_rollout = forward_rollout
    peak = os.environ.get("TEST_PEAK_GIB")  # "RANK:GIB": that rank's peak memory in every phase
    if peak and int(peak.split(":")[0]) == rank:
        import engine.trainer

        engine.trainer._peak_gib = lambda device: float(peak.split(":")[1])
    history = cli(sys.argv[2:], generator_factory=factory)  # (input errors in one line, as the command line)
    torch.save(
        {"history": history, "policy": {k: v.detach().clone() for k, v in holder["policy"].state_dict().items()}},
        os.path.join(out, f"result-rank{rank}.pt"),
    )
    assert not dist.is_initialized()
    # the exit handlers (the tests' hooks write their records in theirs), then out past the interpreter's teardown:
    # about 1 s of a launch's 18 on 2 cores (the run has returned, its files are written and closed)
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
