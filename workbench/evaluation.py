"""`python -m workbench eval`: sample from checkpoints and a baseline, judge, write eval.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from inspo_core.config import opt
from inspo_core.evaluate import JudgementLog, generate_responses, judge_all, summarize, write_json
from inspo_core.judges import JUDGES, make_judge


@dataclass
class EvalConfig:
    checkpoints: list = opt([], "checkpoint directories (a run directory means its final/)")
    baseline: str = opt("ref", "'ref' (the run's starting model, pi_ref in worlds) or a checkpoint directory")
    prompts: str = opt("world", "'world' (a world's prompts), or a .jsonl with 'prompt' or a .txt, one per line")
    judge: str = opt("oracle", "who decides", choices=list(JUDGES))
    judge_model: str | None = opt(None, "reward model or judge LM directory (judge=reward_model or llm)")
    judge_url: str | None = opt(None, "OpenAI-compatible base URL (judge=http; default INSPO_JUDGE_BASE_URL)")
    n_samples: int = opt(20, "responses per prompt from each model")
    temperature: float = opt(0.7, "sampling temperature (paper: 0.7)")
    top_p: float = opt(0.95, "nucleus sampling (paper: 0.95)")
    max_new_tokens: int = opt(64, "generation length cap")
    seed: int = opt(0, "sampling seed (the same for every model)")
    n_boot: int = opt(1000, "bootstrap resamples for the confidence intervals")
    output: str | None = opt(None, "eval.json path (default: eval.json in the first checkpoint's run directory)")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")

    def __post_init__(self):
        if not self.checkpoints:
            raise ValueError("eval needs at least one checkpoint: --checkpoints runs/a,runs/b")


def model_dir(path: str) -> Path:
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        return p / "final"
    if not (p / "config.json").is_file():
        raise ValueError(f"{path}: not a checkpoint (no config.json) and not a run directory (no final/)")
    return p


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


def run_eval(cfg: EvalConfig, log=print) -> dict:
    from inspo_core.worlds.token import world_of

    ckpts = [model_dir(c) for c in cfg.checkpoints]
    found = world_of(ckpts[0])
    world, ref_dir = found if found else (None, None)
    if cfg.baseline == "ref":
        if ref_dir is None:
            import yaml

            conf = ckpts[0].parent / "config.yaml"
            if not conf.is_file():
                raise ValueError("baseline 'ref' needs a run directory (its config.yaml names the starting model)")
            ref_dir = Path(yaml.safe_load(conf.read_text())["resolved_model"])
        baseline = ref_dir
    else:
        baseline = model_dir(cfg.baseline)
    prompts = load_prompts(cfg.prompts, world)
    judge = make_judge(cfg.judge, world=world, path=cfg.judge_model, base_url=cfg.judge_url,
                       trust_remote_code=cfg.trust_remote_code)
    out_path = Path(cfg.output) if cfg.output else ckpts[0].parent / "eval.json"
    gen = dict(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
               seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    log(f"sampling {cfg.n_samples} x {len(prompts)} responses from the baseline {baseline}")
    base = generate_responses(baseline, prompts, **gen)
    results = {}
    for ck in ckpts:
        log(f"sampling and judging {ck}")
        cand = generate_responses(ck, prompts, **gen)
        items = [(f"{i}:{k}", prompts[i], a, b) for i in range(len(prompts))
                 for k, (a, b) in enumerate(zip(cand[i], base[i]))]
        jlog = JudgementLog(out_path.with_name(f"judgements-{ck.parent.name}-{ck.name}-{cfg.judge}.jsonl"))
        judged = judge_all(judge, [(key, p if isinstance(p, str) else json.dumps(p), a, b) for key, p, a, b in items],
                           jlog)
        results[str(ck)] = summarize(judged, n_boot=cfg.n_boot, seed=cfg.seed)
        r = results[str(ck)]
        log(f"  win rate {r['win_rate']:.3f} [{r['win_rate_ci'][0]:.3f}, {r['win_rate_ci'][1]:.3f}], "
            f"LC {r['lc_win_rate']:.3f}")
    doc = {"judge": cfg.judge, "baseline": str(baseline), "prompts": len(prompts), "n_samples": cfg.n_samples,
           "temperature": cfg.temperature, "top_p": cfg.top_p, "results": results}
    write_json(out_path, doc)
    log(f"wrote {out_path}")
    return doc
