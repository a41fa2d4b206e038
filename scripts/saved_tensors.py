"""What autograd keeps for the backward of one SmolLM2 LoRA step, by module kind, per strategy x packing x context
layout: the bytes of every distinct storage saved for the backward (`torch.autograd.graph.saved_tensors_hooks`),
attributed to the innermost module running when it was saved, divided by the step's real tokens.

If INS-DPO keeps the same bytes per token as DPO, its memory over DPO's is its token ratio and nothing per view.

    PYTHONPATH=. python scripts/saved_tensors.py PAIRS.jsonl MODEL_DIR [--pairs_per_step 8] [--gradient_checkpointing]
        [--timeline]   # and the live tensors at the step's peak by category (torch's memory profiler)
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch


def kind(name: str) -> str:
    """A module's kind from its qualified name: the LM head, attention, MLP, norms, LoRA adapters, or body."""
    if "lora_" in name:
        return "lora"
    for k in ("self_attn", "mlp"):
        if f".{k}" in name:
            return "attention" if k == "self_attn" else "mlp"
    if "norm" in name:
        return "norm"
    if "embed" in name:
        return "embedding"
    return "other (residuals, head, loss)"


def account(model, scorer, prepared, loss_fn) -> dict[str, float]:
    """Bytes saved for the backward per module kind (each storage once, where it was first saved; the
    parameters, which autograd saves too, left out)."""
    from inspo_core.scoring import score_batch

    stack = ["top"]
    hooks = []
    for name, mod in model.named_modules():
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        hooks.append(mod.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))
    seen: dict[int, tuple[str, int]] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved too, but not activations

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.untyped_storage().data_ptr() not in weights:
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), (kind(stack[-1]), s.nbytes()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scored = score_batch(scorer, prepared)
            loss = loss_fn(scored)
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    out: dict[str, float] = defaultdict(float)
    for k, nbytes in seen.values():
        out[k] += nbytes
    return dict(out)


def peak_by_category(scorer, prepared, loss_fn) -> dict[str, float]:
    """The live tensors at the peak of one forward + backward, MB by torch's memory-profiler category (activation,
    temporary, gradient, autograd detail, ...), from the profiler's allocation timeline on the CPU."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    from inspo_core.scoring import score_batch

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        loss_fn(score_batch(scorer, prepared)).backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    at = max(sizes, key=sum)
    names = {i + 1: (c.name.lower() if c is not None else "unknown") for c, i in _CATEGORY_TO_INDEX.items()}
    out = {names[i]: round(v / 2**20, 1) for i, v in enumerate(at) if i in names and v}
    return {"total": round(sum(at) / 2**20, 1), **out}


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
    from inspo_core.logps import TokenLogps
    from inspo_core.plan import enable_checkpointing
    from inspo_core.scoring import prepare_batch, score_batch
    from inspo_core.strategies import resolve_method
    from inspo_core.tree_attention import use_tree_attention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs")
    ap.add_argument("model")
    ap.add_argument("--pairs_per_step", type=int, default=8)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--timeline", action="store_true", help="also the live tensors at the step's peak, by category")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()[: args.pairs_per_step]]
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    use_tree_attention(model)  # a padded batch has no tree segments: plain attention
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    scorer = TokenLogps(model, chunk_mb=256)
    out = []
    from scripts.memory_by_tokens import CONFIGS  # the same configurations as the peak-memory runs

    for strategy, packing, context in CONFIGS:
        method = resolve_method("dpo", strategy)
        builder = ConditioningBuilder(tok, BuilderConfig(context_format=context, max_length=192),
                                      sorted(set(method.policy_views) | set(method.ref_views)))
        pairs = [builder.build(r, i) for i, r in enumerate(rows)]
        pad = tok.pad_token_id or 0
        prepared = prepare_batch(pairs, method.policy_views, packing=packing, pad_id=pad)
        with torch.no_grad():  # the reference's log-probs (the policy's own at its start: LoRA's B is zero)
            ref = score_batch(scorer, prepare_batch(pairs, method.ref_views, packing=packing, pad_id=pad)).logps
        loss_fn = lambda s: method.loss(s.logps, ref, s.lengths).losses.mean()  # noqa: E731
        saved = account(model, scorer, prepared, loss_fn)
        model.zero_grad(set_to_none=True)
        peak = peak_by_category(scorer, prepared, loss_fn) if args.timeline else None
        model.zero_grad(set_to_none=True)
        total = sum(saved.values())
        row = dict(strategy=strategy, packing=packing, context=context, tokens=prepared.tokens,
                   positions=prepared.batch.input_ids.numel(), saved_mb=total / 2**20,
                   kb_per_token={k: round(v / prepared.tokens / 1024, 1) for k, v in sorted(saved.items())},
                   **({"peak_live_mb": peak} if peak else {}))
        out.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
