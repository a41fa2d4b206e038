"""The benchmark's contract (rows and keys) on a tiny model; speed itself is not asserted here."""

import json

import pytest

from workbench.bench import BenchConfig, check_targets
from workbench.bench_data import synthetic_pairs
from workbench.cli import main

CONTRACT = {"strategy", "packing", "reference", "pairs_per_s", "sec_per_step", "tokens_per_s", "tokens_processed",
            "model_flops", "mfu", "executed_flops", "mfu_executed", "peak_mem_mb"}


def test_bench_rows_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--prompt_len", "16", "--response_len", "8", "--batch_size", "2",
                 "--steps", "1", "--rounds", "1", "--warmup", "0", "--memory", "false", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert len(rows) == 12 and {(r["strategy"], r["packing"], r["reference"]) for r in rows} == {
        (s, p, r) for s in ("none", "symmetric", "averaged") for p in ("padded", "tree") for r in ("cached", "live")}
    for r in rows:
        assert CONTRACT <= set(r) and r["pairs_per_s"] > 0 and 0 < r["mfu"]
    by = {(r["strategy"], r["packing"], r["reference"]): r for r in rows}
    # tokens processed follow from the layout: none padded = 2 rows of prompt + response per pair
    P, W, C = 16, 8, 8 + 1  # sep context: [SEP] + response without EOS + [SEP]
    assert by[("none", "padded", "cached")]["tokens_processed"] == 2 * 2 * (P + W)
    assert by[("none", "tree", "cached")]["tokens_processed"] == 2 * (P + 2 * W)
    assert by[("symmetric", "tree", "cached")]["tokens_processed"] == 2 * (P + 2 * C + 2 * W)
    assert "targets:" in capsys.readouterr().out and "symmetric/none time (tree)" in check_targets(rows)
    # peak memory, measured in a child process per configuration on CPU
    assert main(["bench", "--preset", "tiny", "--prompt_len", "16", "--response_len", "8", "--batch_size", "2",
                 "--steps", "1", "--rounds", "1", "--strategies", "symmetric", "--packings", "tree",
                 "--references", "cached", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["peak_mem_mb"] > 0


def test_raw_layout_lets_averaged_share_contexts():
    """With raw contexts the averaged tree is no bigger than the symmetric one (plain targets are the contexts)."""
    from inspo_core.packing import build_tree
    from inspo_core.strategies import required_views

    cfg = BenchConfig(preset="tiny", context_format="raw", batch_size=1)
    pair = synthetic_pairs(cfg, 1000)[0]
    size = lambda s: sum(len(x.tokens) for x in build_tree(pair, required_views(s, "dpo")[0]))  # noqa: E731
    assert size("averaged") == size("symmetric") == cfg.prompt_len + 4 * cfg.response_len


def test_realistic_lengths_are_the_same_tokens_for_us_and_trl():
    """The realistic preset writes token ids as words: our builder and TRL's tokenisation (prompt text +
    completion text, EOS added as text) see the same ids; lengths spread and chosen != rejected."""
    from workbench.bench_data import Data, realistic_rows, word_tokenizer

    cfg = BenchConfig(preset="tiny", lengths="realistic", batch_size=4, n_batches=2, max_length=512)
    rows = realistic_rows(cfg, 1000)
    tok = word_tokenizer(1000)
    lens = [len(r[k].split()) for r in rows for k in ("chosen", "rejected")]
    assert len(rows) == 8 and min(lens) >= 20 and max(lens) <= 400 and len(set(lens)) > 8
    batches = Data(cfg, 1000).batches("none")
    assert [len(b) for b in batches] == [4, 4]
    for row, pair in zip(rows, [p for b in batches for p in b]):
        prompt = tok(row["prompt"])["input_ids"]
        assert prompt == [int(w[1:]) for w in row["prompt"].split()] == pair.prompt_ids
        for r in ("chosen", "rejected"):
            trl_ids = tok(row["prompt"] + f" {row[r]} </s>")["input_ids"][len(prompt):]
            want = ([int(w[1:]) for w in row[r].split()] + [2])[: 512 - len(prompt)]  # keep_start truncation
            assert pair.targets[r] == trl_ids[: 512 - len(prompt)] == want


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_model_flops_match_torch_flop_counter(lora_r):
    """The bench's model FLOPs against an independent count: torch's FlopCounterMode over the forward
    (and forward + backward) the scorer actually runs, one sequence per forward (no padding), SDPA on
    its math kernel so attention is counted as the matmuls it is (CPU's fused kernel is not counted).
    What the counter executes and what model FLOPs count differ in two known ways only: attention is
    computed as the full n x n square (model FLOPs count its causal half), and the backward recomputes
    the checkpointed LM head once when the head is trained (under LoRA it is frozen and not recomputed). Before the fix the bench charged the LM head at every token and the
    norm weights as matmuls: 28.67M FLOPs for a forward the counter puts at 20.41M. Under LoRA the frozen base
    weights' backward computes their input's gradient only: 4 FLOPs per weight per token, not 6."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from inspo_core.conditioning import BuiltPair
    from inspo_core.scoring import score_views
    from inspo_core.strategies import resolve_method
    from workbench.bench import model_for, with_lora
    from workbench.bench_data import matmul_params, model_flops

    cfg = BenchConfig(preset="tiny", prompt_len=16, response_len=8, batch_size=2)
    model = with_lora(model_for(cfg), lora_r)
    mc = model.config
    cases = [(synthetic_pairs(cfg, mc.vocab_size), resolve_method("dpo", "symmetric").policy_views),
             # uneven lengths, and fewer scored tokens than target tokens (an EOS left out of the loss)
             ([BuiltPair(0, [3] * 10, {"chosen": [5] * 6, "rejected": [6] * 4}, {}, {"chosen": 5, "rejected": 3})],
              resolve_method("dpo", "none").policy_views)]

    def counted(train: bool) -> dict[str, float]:
        fc = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), fc:
            for pairs, views in cases:
                for p in pairs:
                    for v in views:
                        with torch.set_grad_enabled(train):
                            out = score_views(model, [p], [v], packing="padded").logps[v]
                        if train:
                            out.sum().backward()
        c = fc.get_flop_counts()
        ops = {str(k): n for k, n in c["Global"].items()}
        assert set(ops) == {"aten.mm", "aten.bmm"}  # linears, attention
        head = sum(sum(n.values()) for k, n in c.items() if k.endswith("lm_head"))
        return {"linear": ops["aten.mm"], "attention": ops["aten.bmm"], "head": head}

    def bench(train: bool) -> float:
        return sum(model_flops(pairs, views, matmul_params(model), mc.num_hidden_layers, mc.hidden_size, train)
                   for pairs, views in cases)

    fwd, both = counted(False), counted(True)
    assert bench(False) == fwd["linear"] + fwd["attention"] / 2
    # a trained head is checkpointed and runs once more in the backward; a frozen one (LoRA leaves the head
    # alone) forms its input gradient in the forward (logps._FrozenHeadLogps): the minimal two products
    recompute = fwd["head"] if lora_r == 0 else 0
    assert bench(True) == both["linear"] - recompute + both["attention"] / 2
    assert both["attention"] == 3 * fwd["attention"]  # the x3 rule, independently


@pytest.mark.slow
def test_trl_row_runs_beside_ours(tmp_path):
    """With trl installed, the realistic preset adds TRL's DPOTrainer as a timed peer row."""
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--lengths", "realistic", "--max_length", "128", "--batch_size", "2",
                 "--n_batches", "1", "--steps", "1", "--rounds", "1", "--warmup", "1", "--memory", "false",
                 "--strategies", "none", "--packings", "padded", "--references", "cached", "--json", str(out)]) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"none", "trl-dpo"} and rows["trl-dpo"]["sec_per_step"] > 0
    assert rows["none"]["time_ratio_vs_trl"] == rows["none"]["sec_per_step"] / rows["trl-dpo"]["sec_per_step"]


def test_executed_flops_of_a_step_without_padding():
    """What a step executes (FlopCounterMode over the runner's own step) against the model FLOPs derived by hand:
    with every sequence of one length there is no padding, so the difference is exactly the two things a step
    runs beyond the minimal work: attention's full square (the math kernel; model FLOPs count its causal half)
    and the LM head's forward once more in the backward (the chunked head is checkpointed)."""
    from workbench.bench import Runner, _setup, executed_flops
    from workbench.bench_data import Data, matmul_params, model_flops

    cfg = BenchConfig(preset="tiny", prompt_len=16, response_len=8, batch_size=2, references=["cached"])
    dev, policy, ref = _setup(cfg, live_reference=False)
    mc = policy.config
    r = Runner(cfg, "none", "padded", "cached", policy, ref, Data(cfg, mc.vocab_size).batches("none"), dev)
    pairs, views = r.pairs[0], r.method.policy_views
    n = [len(p.sequence(v)[0]) for p in pairs for v in views]
    assert len(set(n)) == 1  # one length: no padding
    scored = sum(p.loss_lengths[v.target] for p in pairs for v in views)
    m = matmul_params(policy)
    minimal = model_flops(pairs, views, m, mc.num_hidden_layers, mc.hidden_size, train=True)
    upper_half = 3 * 2 * mc.num_hidden_layers * mc.hidden_size * sum(k * k for k in n)
    recompute = 2 * m.head * scored
    assert executed_flops(r) == minimal + upper_half + recompute


def test_the_length_sweep_tags_rows_and_summarises_them(tmp_path):
    """A sweep runs the fixed-length bench per response length (prompts half as long), keeps each row's
    length, and its summary's spread is computed from the rows' own MFU values."""
    out = tmp_path / "sweep.json"
    assert main(["bench", "--preset", "tiny", "--sweep", "8,16", "--batch_size", "2", "--steps", "1", "--rounds", "1",
                 "--warmup", "0", "--memory", "false", "--strategies", "none,symmetric", "--packings", "padded,tree",
                 "--references", "cached", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert sorted({(r["response_len"], r["prompt_len"]) for r in rows}) == [(8, 4), (16, 8)]
    assert len(rows) == 2 * 2 * 2
    for g in doc["summary"]:
        mfu = [r["mfu_executed"] for r in sorted(rows, key=lambda r: r["response_len"])
               if (r["strategy"], r["packing"]) == (g["strategy"], g["packing"])]
        assert g["mfu_executed"] == mfu
        mean = sum(mfu) / len(mfu)
        assert g["mfu_spread"] == [max(mfu) / mean - 1, min(mfu) / mean - 1]
    longer = {(r["strategy"], r["packing"]): r["tokens_processed"] for r in rows if r["response_len"] == 16}
    shorter = {(r["strategy"], r["packing"]): r["tokens_processed"] for r in rows if r["response_len"] == 8}
    assert all(longer[k] > shorter[k] for k in longer)
    assert (tmp_path / "sweep.html").read_text().count("executed-FLOP MFU") >= 1


def test_activation_checkpointing_recomputes_the_body_once_and_changes_no_gradient():
    """`bench --gradient_checkpointing` (the trainer's setting, one helper for both) runs each decoder layer's
    forward again in the backward: the step executes one more forward of the body (its matmuls but each
    layer's last, and attention's full squares, counted by hand) and the gradients are those of the plain step."""
    import torch

    from inspo_core.scoring import score_batch
    from workbench.bench import Runner, _setup, executed_flops
    from workbench.bench_data import Data, matmul_params

    def runner(gc: bool):
        cfg = BenchConfig(preset="tiny", prompt_len=16, response_len=8, batch_size=2, references=["cached"],
                          gradient_checkpointing=gc)
        dev, policy, ref = _setup(cfg, live_reference=False)
        return Runner(cfg, "symmetric", "padded", "cached", policy, ref,
                      Data(cfg, policy.config.vocab_size).batches("symmetric"), dev)

    plain, ckpt = runner(False), runner(True)
    mc = plain.policy.config
    n = [len(p.sequence(v)[0]) for p in plain.pairs[0] for v in plain.method.policy_views]
    assert len(set(n)) == 1  # one length: no padding
    # the recompute stops once the last tensor the backward needs is back (torch's non-reentrant early stop):
    # each layer's last matmul, down_proj, is not run again (its backward needs its input, not its output)
    down = sum(layer.mlp.down_proj.weight.numel() for layer in plain.policy.get_decoder().layers)
    body = matmul_params(plain.policy).body
    forward_again = 2 * (body - down) * sum(n) + 4 * mc.num_hidden_layers * mc.hidden_size * sum(k * k for k in n)
    grads = []
    for r in (plain, ckpt):  # the step's loss, its gradient kept (the same seeded weights in both)
        scored = score_batch(r.scorer, r.batches[0], device=r.dev)
        r.method.loss(scored.logps, r.cached[0], scored.lengths).losses.mean().backward()
        grads.append([p.grad.clone() for p in r.policy.parameters() if p.requires_grad])
        r.opt.zero_grad(set_to_none=True)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert executed_flops(ckpt) == executed_flops(plain) + forward_again
