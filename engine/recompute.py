"""How many layers to recompute in the backward (activation checkpointing), from the memory a micro-batch needs.

Recomputing a layer costs one more forward of it (a third of its training FLOPs) and saves what autograd keeps
of it for the backward; recomputing every layer is the safe choice and wastes that third wherever memory would
have held the activations. `activation_checkpointing=auto` on a GPU recomputes the fewest layers (the first k)
that let a micro-batch of `micro_batch_tokens` fit in the memory left once the models, their grads and the
optimizer states are counted, re-planned before each training phase.

What a layer keeps is measured, not modelled: one layer's forward on a short probe under autograd's saved-tensor
hooks, the bytes of every distinct storage it saves other than the weights (linear in the tokens: the attention
keeps a row statistic, not the scores). So the count is the same on every device and follows the kernels.
"""

from __future__ import annotations

import torch

from engine import grad_sums
from engine.distributed import agree
from engine.errors import InvalidInput
from engine.model import Transformer
from kernels.dispatch import fp32_out_gemm


def setting(ac: str, num_layers: int, device: torch.device) -> bool | int:
    """RunConfig.activation_checkpointing -> Transformer.activation_checkpointing (auto: all layers on a GPU until
    plan_models, none on CPU)."""
    if ac in ("on", "off"):
        return ac == "on"
    if ac == "auto":
        return device.type == "cuda"
    if ac.isdigit() and int(ac) <= num_layers:
        return int(ac)
    raise InvalidInput(
        f"--activation-checkpointing must be auto, on, off or a number of layers up to {num_layers}, got {ac!r}"
    )


def layers_recomputed(model: Transformer) -> int:
    ac = model.activation_checkpointing
    return len(model.layers) if ac is True else int(ac)


def layer_activation_bytes(model: Transformer, tokens: int = 256) -> float:
    """Bytes per token that one decoder layer keeps for its backward (its inputs included), measured on `tokens`
    tokens of one sequence. Under TP every rank of the group must call it (the layer's collectives)."""
    tokens = -(-tokens // model.tp) * model.tp
    sp = model.sequence_parallel
    layer = model.layers[min(1, len(model.layers) - 1)]
    p = next(model.parameters())
    rows = tokens // model.tp if sp else tokens
    h = torch.randn(rows, model.config.hidden_size, device=p.device, dtype=p.dtype, requires_grad=True)
    delta = torch.randn_like(h, requires_grad=True)
    positions = torch.arange(tokens, device=p.device)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=p.device)
    weights = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: dict[int, int] = {}
    held: list[torch.Tensor] = []  # every saved tensor, alive until the probe ends: no storage freed and its address
    # reused by a later one (counted once for two)

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        held.append(t)
        # The graph keeps nothing: no backward runs. (Returning t itself made a cycle through autograd's C++ objects
        # wherever t is the output of the node saving it: Python's gc cannot break it, so the probe's graph, with
        # the probed layer's weights' storage, lived on; an offloaded model's weights then stayed on the GPU too.)
        return None

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("layer_activation_bytes's probe keeps no tensors: nothing may run its backward")

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = layer(h, delta, positions, cu, sp)
    del out
    held.clear()
    return sum(seen.values()) / tokens


def checkpoint_bytes(model: Transformer) -> float:
    """Bytes per token a recomputed layer keeps: its two inputs (the residual stream and the previous MLP output;
    this rank's share of the tokens under sequence parallelism)."""
    elt = next(model.parameters()).element_size()
    return 2 * model.config.hidden_size * elt / (model.tp if model.sequence_parallel else 1)


def plan_recompute(num_layers: int, tokens: int, per_layer: float, per_checkpoint: float, fixed: float, budget: float):
    """The fewest layers k to recompute so that a micro-batch of `tokens` fits in `budget` bytes: k layers keep
    their inputs, the others everything, one layer's worth is live again in the backward, plus `fixed` bytes per
    token (the gathered final hidden states and their grad). num_layers when even that does not fit."""
    for k in range(num_layers + 1):
        need = tokens * ((num_layers - k) * per_layer + k * per_checkpoint + per_layer + fixed)
        if need <= budget:
            return k
    return num_layers


def training_budget(optimizers, device: torch.device, margin: float = 0.08, held: int = 0) -> int:
    """CUDA: the bytes a training micro-batch's activations may take: free memory (the allocator's cached blocks
    included) less what the optimizers have yet to allocate (Adam moments before the first step, fp32 grads
    before the first micro-batch: one model's whole with the distributed optimizer, every model's without; a
    parameter's bf16 grad during a backward), `held` (what a micro-batch holds beside its activations: the fused
    loss's fp32 LM-head gradient) and a margin of the device's memory (the log-prob chunks, fragmentation)."""
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    pending, transient, flat = 0, 0, 0
    for opt in optimizers:
        for m in opt.masters:
            if not opt.adam.state.get(m):
                pending += 2 * m.numel() * 4  # exp_avg, exp_avg_sq
        if opt.buckets is None:  # every model's, held until the step's updates (an fp32 parameter's in its .grad)
            pairs = zip(opt.masters, opt.params, opt.grads)
            pending += sum(4 * m.numel() for m, p, g in pairs if g is None and (m is not p or p.grad is None))
        else:  # the flat fp32 grads, allocated by a model's first micro-batch of a step and reduce-scattered into
            # its shard before the next model's backward (engine.trainer.train_step): one model's at a time
            flat = max(flat, sum(4 * b.numel for b in opt.buckets if b.grad is None))
            # the shards, until the update
            pending += sum(4 * m.numel() for m, g in zip(opt.masters, opt.grads) if g is None)
        # a backward's grad in the parameters' dtype before it joins the fp32 ones: one parameter's at a time, folded
        # as autograd finishes it (engine.optim.fold_during_backward; without buckets an fp32 parameter's is its
        # fp32 grad, counted above; `masters` pairs with `params` only then)
        own = {id(p) for p, m in zip(opt.params, opt.masters) if m is p} if opt.buckets is None else set()
        transient = max([transient, *(p.numel() * p.element_size() for p in opt.params if id(p) not in own)])
    return int(free - pending - flat - transient - held - margin * total)


def lm_head_grad_bytes(models: dict[str, Transformer]) -> int:
    """What the fused PPO loss holds of this rank's LM head's gradient from its forward through its backward
    (kernels.logprob), beside a micro-batch's activations: the largest of the trained LM models'. An fp32 [V, H] sum
    of the chunks (1.96 GiB for a 128k vocabulary of width 4096 at TP 1); none where the grad goes straight into the
    optimizer's fp32 sum (engine.grad_sums: the sum is the optimizer's, counted with its grads) by a GEMM with an
    fp32 output, but a chunk's product in the weight's dtype where the device has none (kernels.dispatch.add_matmul_);
    none for a weight in fp32 (it accumulates in its own .grad)."""

    def held(w: torch.Tensor) -> int:
        if w.dtype == torch.float32:
            return 0
        if grad_sums.ENABLED and getattr(w, "grad_sum", None) is not None:  # (an optimizer takes its grads)
            return 0 if fp32_out_gemm(w.device) else w.numel() * w.element_size()
        return 4 * w.numel()

    return max((held(m.lm_head_weight) for m in models.values() if m.head == "lm"), default=0)


def mlp_recompute(model: Transformer, on: bool) -> None:
    """Whether training keeps each MLP's gate/up output and recomputes its activation in the backward (engine.model's
    MLP.recompute_act) instead of keeping both."""
    for layer in model.layers:
        layer.mlp.recompute_act = on


def activation_bytes(model: Transformer, tokens: int = 256) -> tuple[float, float]:
    """layer_activation_bytes with the MLP's activation kept, and recomputed (mlp_recompute)."""
    was = bool(model.layers) and model.layers[0].mlp.recompute_act
    kept = []
    for on in (False, True):
        mlp_recompute(model, on)
        kept.append(layer_activation_bytes(model, tokens))
    mlp_recompute(model, was)
    return kept[0], kept[1]


def plan_models(models: dict[str, Transformer], optimizers, tokens: int, device: torch.device, cache: dict) -> None:
    """Set each trained model's activation_checkpointing to the fewest layers that let a micro-batch of `tokens`
    fit the training budget (CUDA). Where some would be recomputed, the MLPs' activations are recomputed first
    (mlp_recompute: one elementwise pass a layer in the backward, against a third of a layer's FLOPs for each layer
    it spares), and the layers planned with what a layer then keeps. `cache` keeps each model's measured bytes per
    layer and token (activation_bytes). Every rank ends with the largest plan of any rank (its layers' collectives
    must match)."""
    budget = training_budget(optimizers, device, held=lm_head_grad_bytes(models))
    plans = {False: [], True: []}
    for name, model in models.items():
        if name not in cache:
            cache[name] = activation_bytes(model)
        elt = next(model.parameters()).element_size()
        for on, per_layer in zip((False, True), cache[name]):
            plans[on].append(
                plan_recompute(
                    len(model.layers), tokens, per_layer, checkpoint_bytes(model), 4 * model.config.hidden_size * elt,
                    budget,
                )
            )  # fmt: skip
    agreed = agree(plans[False] + plans[True], "max")
    n = len(models)
    for i, model in enumerate(models.values()):
        on = agreed[i] > 0
        mlp_recompute(model, on)
        model.activation_checkpointing = agreed[n + i] if on else 0
