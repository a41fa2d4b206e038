"""The evaluation pipeline behind `python -m workbench eval` and the app's Batch tab: sample from checkpoints and a baseline, judge, write win_rates.json."""

from __future__ import annotations

import json
from pathlib import Path

from inspo_core.eval_config import EvalConfig
from inspo_core.evaluate import (
    JudgementLog, describe_checkpoint, generate_responses, judge_all, judgement_key, summarize, write_json,
)
from inspo_core.judges import make_judge
from inspo_core.rundir import RunDir, model_dir


def load_prompts(spec: str, world) -> list:
    if spec == "world":
        if world is None:
            raise ValueError("--prompts world needs world checkpoints; give a prompt file instead")
        return list(world.prompts)
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"prompt file {spec!r} not found")
    if p.suffix == ".jsonl":
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        missing = [i for i, r in enumerate(rows) if "prompt" not in r]
        if missing:
            raise ValueError(f"{spec}: row {missing[0]} has no 'prompt' field")
        return [r["prompt"] for r in rows]
    return [line for line in p.read_text().splitlines() if line.strip()]


def check_output(path: Path) -> None:
    """Refuse to write over a file that is not an earlier eval's output (e.g. a demo's eval.json)."""
    if not path.exists():
        return
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not (isinstance(doc, dict) and "results" in doc and "judge_identity" in doc):
        raise ValueError(f"--output {path} exists and is not an eval's output (another command's record?); "
                         "choose another --output")


def run_eval(cfg: EvalConfig, log=print) -> dict:
    """Sample every checkpoint and the baseline on the same prompts and seeds, judge each answer
    against the baseline's, write the win rates (by default the run's win_rates.json, never the
    demo's eval.json). Judgements are keyed by what was judged (both models'
    identities, prompt, answers, sampling, judge), so a rerun reuses exactly its own finished work."""
    return evaluate(cfg, log)[0]


def resolve_models(checkpoints: list, baseline: str | None, cache_dir: str):
    """(checkpoint directories, the world of the first or None, the reference directory, the baseline's
    directory). `baseline` 'ref' is the world's pi_ref, else the run's starting model (config.yaml's
    resolved_model), and the reference directory becomes it; None resolves no baseline."""
    from inspo_core.catalog import resolve_model
    from inspo_core.worlds import world_of

    ckpts = [model_dir(resolve_model(c, cache_dir)) for c in checkpoints]
    found = world_of(ckpts[0])
    world, ref_dir = found if found else (None, None)
    if baseline is None:
        return ckpts, world, ref_dir, None
    if baseline != "ref":
        return ckpts, world, ref_dir, model_dir(resolve_model(baseline, cache_dir))
    if ref_dir is None:
        run = RunDir.of_model(ckpts[0])
        resolved = run.read_config().get("resolved_model") if run else None
        if not resolved:
            raise ValueError("baseline 'ref' needs a run directory (its config.yaml names the starting model); "
                             "give --baseline PATH instead")
        ref_dir = Path(resolved)
    return ckpts, world, ref_dir, ref_dir


def evaluate(cfg: EvalConfig, log=print, progress=None) -> tuple[dict, dict[str, list]]:
    """`run_eval`'s work: (the document it writes, each checkpoint's judgements in prompt x sample order).
    The app's Batch tab calls this too, so a Batch result and an `eval` result with the same settings are
    the same numbers from the same judgements. `progress(fraction, what)` is told each stage."""

    progress = progress or (lambda fraction, what: None)

    from inspo_core.catalog import resolve_model

    ckpts, world, ref_dir, baseline = resolve_models(cfg.checkpoints, cfg.baseline, cfg.cache_dir)
    prompts = load_prompts(cfg.prompts, world)
    judge_model = resolve_model(cfg.judge_model, cfg.cache_dir) if cfg.judge_model else None
    judge = make_judge(cfg.judge, world=world, path=judge_model, base_url=cfg.judge_url,
                       trust_remote_code=cfg.trust_remote_code)
    judge.check()  # an unreachable judge stops here, before any sampling
    run = RunDir.of_model(ckpts[0])
    out_path = Path(cfg.output) if cfg.output else (run or RunDir(ckpts[0].parent)).win_rates_json
    check_output(out_path)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    gen = dict(n=cfg.n_samples, trust_remote_code=cfg.trust_remote_code, **sampling)
    base_id = describe_checkpoint(baseline)
    judge_id = judge.identity()
    log(f"sampling {cfg.n_samples} x {len(prompts)} responses from the baseline {baseline}")
    progress(0.05, "sampling the baseline")
    base = generate_responses(baseline, prompts, **gen)
    jlog = JudgementLog(out_path.with_name(out_path.stem + ".judgements.jsonl"))
    if jlog.skipped:
        log(f"{jlog.path}: {jlog.skipped} line(s) are not judgements (cut by a crash or of another shape); "
            "skipped, their items are judged again")
    results, judgements = {}, {}
    for j, ck in enumerate(ckpts):
        ck_id = describe_checkpoint(ck)
        log(f"sampling and judging {ck}")
        progress(0.1 + 0.9 * j / len(ckpts), f"sampling {ck.name}")
        cand = generate_responses(ck, prompts, **gen)
        items = []
        for i, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else json.dumps(prompt)
            for k, (a, b) in enumerate(zip(cand[i], base[i])):
                key = judgement_key(candidate=ck_id["fingerprint"], baseline=base_id["fingerprint"], prompt=text,
                                    sample=k, a=a, b=b, sampling=sampling, judge=judge_id)
                items.append((key, text, a, b))
        progress(0.1 + 0.9 * (j + 0.5) / len(ckpts), f"judging {ck.name}")
        judged, calls = judge_all(judge, items, jlog)
        judgements[str(ck)] = judged
        r = summarize(judged, n_boot=cfg.n_boot, seed=cfg.seed)
        results[str(ck)] = {**ck_id, **r, "judge_calls": calls, "reused": len(items) - calls}
        log(f"  win rate {r['win_rate']:.3f} [{r['win_rate_ci'][0]:.3f}, {r['win_rate_ci'][1]:.3f}], "
            f"LC {r['lc_win_rate']:.3f} ({calls} judge calls, {len(items) - calls} reused)")
    doc = {"judge": cfg.judge, "judge_identity": judge_id, "baseline": str(baseline), "baseline_identity": base_id,
           "prompts": len(prompts), "prompts_source": cfg.prompts, "n_samples": cfg.n_samples, "sampling": sampling,
           "sampler": "per-answer seeds",
           "temperature": cfg.temperature, "top_p": cfg.top_p, "results": results}
    write_json(out_path, doc)
    log(f"wrote {out_path}")
    return doc, judgements
