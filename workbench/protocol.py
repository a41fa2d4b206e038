"""`python -m workbench protocol`: the paper's Table 2 protocol for a list of checkpoints against one baseline.

Three prompt sets, one table in the paper's columns, each with its interval:
- AlpacaEval 2: win rate (WR) and length-controlled win rate (LC) against the baseline's answers;
- Arena-Hard: win rate (AH WR) and style-controlled win rate (AH SC: Bradley-Terry with length and
  markdown covariates, `inspo_core.style_control`, one fit over every checkpoint);
- MT-Bench: the mean 1-10 single-answer grade over every turn (MT), `inspo_core.grading`.

A prompt set is `world` (the synthetic world's prompts; the checkpoints must be a world's), a file
(.jsonl rows with `prompt`, `instruction` (AlpacaEval), or `turns` (MT-Bench, Arena-Hard v0.1); or
.txt, one prompt per line), or a hub name (`alpaca_eval`, `arena_hard`, `mt_bench`; needs network,
offline it is refused with the file to give instead). The pairwise judge is any `eval` judge (the
world's oracle, a local LM, an OpenAI-compatible server); the grader is the world's oracle (expected
win probability against pi_ref's opponents on 1..10), or the same local LM or server asked MT-Bench's
single-answer prompt. Judgements and grades are keyed by everything that determines them, as in
`eval`, so a rerun reuses exactly its own finished work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from inspo_core.evaluate import (
    JudgementLog, describe_checkpoint, generate_responses, judge_all, judgement_key, summarize, write_json,
)
from inspo_core.judges import make_judge
from workbench.protocol_config import ProtocolConfig

# hub name -> (dataset, config, split, how a row becomes turns); loaded only when asked for, online
HUB_SETS = {
    "alpaca_eval": ("tatsu-lab/alpaca_eval", "alpaca_eval", "eval", lambda r: [r["instruction"]]),
    "arena_hard": ("lmarena-ai/arena-hard-auto-v0.1", None, "train", lambda r: [t["content"] for t in r["turns"]]),
    "mt_bench": ("HuggingFaceH4/mt_bench_prompts", None, "train", lambda r: list(r["prompt"])),
}
# key -> (header, scale printed): win rates in percent, as the paper prints them; MT on 1..10
COLUMNS = {"ae_lc": ("AE2 LC", 100), "ae_wr": ("AE2 WR", 100), "ah_wr": ("AH WR", 100), "ah_sc": ("AH SC", 100),
           "mt": ("MT", 1)}


def load_prompt_set(spec: str, world, what: str) -> list[dict]:
    """[{id, turns: [str, ...], reference: [str, ...] | None}] of one prompt set (module docstring)."""
    if spec == "world":
        if world is None:
            raise ValueError(f"--{what} world needs world checkpoints; give a prompt file or a hub name instead")
        return [{"id": str(i), "turns": [p], "reference": None} for i, p in enumerate(world.prompts)]
    if spec in HUB_SETS:
        name, config, split, turns = HUB_SETS[spec]
        try:
            import datasets

            rows = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # offline, or the hub moved it
            raise ValueError(f"--{what} {spec}: could not load {name} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                             "offline, give the prompts as a .jsonl file instead") from None
        return [{"id": str(r.get("question_id", i)), "turns": turns(r), "reference": r.get("reference") or None,
                 "baseline": r.get("output") or r.get("baseline")} for i, r in enumerate(rows)]
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"--{what} {spec!r}: not 'world', a hub name ({', '.join(HUB_SETS)}) or an existing file")
    if p.suffix != ".jsonl":
        return [{"id": str(i), "turns": [line], "reference": None}
                for i, line in enumerate(x for x in p.read_text().splitlines() if x.strip())]
    out = []
    for i, line in enumerate(x for x in p.read_text().splitlines() if x.strip()):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{spec}: row {i} is not JSON") from None
        if "turns" in r:
            turns = [t["content"] if isinstance(t, dict) else t for t in r["turns"]]
        elif "prompt" in r or "instruction" in r:
            turns = [r.get("prompt", r.get("instruction"))]
        else:
            raise ValueError(f"{spec}: row {i} has none of 'turns', 'prompt', 'instruction'")
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"{spec}: row {i} has an empty or non-text turn")
        ref = r.get("reference")
        row = {"id": str(r.get("question_id", i)), "turns": turns, "reference": list(ref) if ref else None}
        if r.get("output") or r.get("baseline"):
            row["baseline"] = r.get("output") or r.get("baseline")
        out.append(row)
    return out


def fixed_answers(prompt_set: list[dict], what: str) -> list[str]:
    """The baseline answer each row carries (--baseline answers); a row without one is an error naming it."""
    missing = [q["id"] for q in prompt_set if not isinstance(q.get("baseline"), str) or not q["baseline"].strip()]
    if missing:
        raise ValueError(f"--baseline answers: --{what} row {missing[0]} (and {len(missing) - 1} more) carries no "
                         "baseline answer ('output' or 'baseline' field); give a file whose rows do, or a baseline model")
    return [q["baseline"] for q in prompt_set]


def _grader(cfg: ProtocolConfig, world, ref_dir, judge_model):
    from inspo_core.grading import OracleGrader, SingleAnswerGrader, http_chat, local_chat

    kind = cfg.grader or cfg.judge
    if kind == "oracle":
        if world is None:
            raise ValueError("grader oracle needs world checkpoints; use --grader llm or http")
        opp = world.opponents(cfg.cache_dir, ref_dir, cfg.mt_opponents)
        return OracleGrader(world, dict(zip(world.prompts, opp)))
    if kind == "llm":
        if not judge_model:
            raise ValueError("grader llm needs --judge_model PATH")
        chat = local_chat(judge_model, max_new_tokens=cfg.grader_max_tokens, trust_remote_code=cfg.trust_remote_code)
    else:
        chat = http_chat(cfg.judge_url, cfg.judge_name, max_tokens=cfg.grader_max_tokens)
    return SingleAnswerGrader(chat, {"kind": kind, **chat.identity})


def _pairwise(cfg, name, prompt_set, ckpts, ids, baseline, base_id, judge, jlog, gen, sampling, log) -> dict:
    """Per checkpoint, the judgements of its answers against the baseline's on one prompt set."""
    prompts = [q["turns"][0] for q in prompt_set]
    if baseline is None:  # fixed answers: the same one stands against every sample
        base = [[a] * cfg.n_samples for a in fixed_answers(prompt_set, name)]
        base_id = {"fingerprint": judgement_key(fixed_answers=[b[0] for b in base])}
    else:
        log(f"{name}: sampling {cfg.n_samples} x {len(prompts)} answers from the baseline")
        base = generate_responses(baseline, prompts, **gen)
    out = {}
    for ck in ckpts:
        cand = generate_responses(ck, prompts, **gen)
        items = [(judgement_key(candidate=ids[ck]["fingerprint"], baseline=base_id["fingerprint"], prompt=p, sample=k,
                                a=a, b=b, sampling=sampling, judge=judge.identity()), p, a, b)
                 for i, p in enumerate(prompts) for k, (a, b) in enumerate(zip(cand[i], base[i]))]
        judged, calls = judge_all(judge, items, jlog)
        out[ck] = (judged, calls)
        log(f"  {ck}: {len(items)} judgements ({calls} judge calls, {len(items) - calls} reused)")
    return out


def _mt_answers(model, questions, cfg, gen1) -> list[list[list[str]]]:
    """[question][sample][turn] answers; turn t is sampled with the conversation so far (its own earlier answers)."""
    first = generate_responses(model, [q["turns"][0] for q in questions], **gen1)
    out = []
    for i, q in enumerate(questions):
        convs = [[a] for a in first[i]]
        for t in range(1, len(q["turns"])):
            for conv in convs:
                msgs = []
                for u, a in zip(q["turns"][:t], conv):
                    msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                msgs.append({"role": "user", "content": q["turns"][t]})
                conv.append(generate_responses(model, [msgs], **{**gen1, "n": 1})[0][0])
        out.append(convs)
    return out


def _grade_model(model, model_id, questions, grader, glog, cfg, gen1, sampling):
    from inspo_core.grading import summarize_grades

    answers = _mt_answers(model, questions, cfg, gen1)
    grades, calls = [], 0
    for q, convs in zip(questions, answers):
        for k, conv in enumerate(convs):
            key = judgement_key(candidate=model_id["fingerprint"], question=q["turns"], reference=q["reference"],
                                sample=k, answers=conv, sampling=sampling, grader=grader.identity())
            if key not in glog.done:
                glog.add(key, grader.grade(q["turns"], conv, q["reference"], question_id=q["id"]))
                calls += 1
            grades += glog.done[key]
    return summarize_grades(grades, n_boot=cfg.n_boot, seed=cfg.seed), calls


def _cell(value, ci, scale: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    lo, hi = ci
    band = "" if math.isnan(lo) else f" [{lo * scale:.1f}, {hi * scale:.1f}]"
    return f"{value * scale:.1f}{band}"


def table_markdown(rows: dict[str, dict]) -> str:
    head = "| model | " + " | ".join(h for h, _ in COLUMNS.values()) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(r.get(k), r.get(f"{k}_ci", [math.nan] * 2), scale)
                                                  for k, (_, scale) in COLUMNS.items()) + " |")
    return "\n".join(lines)


def run_protocol(cfg: ProtocolConfig, log=print) -> dict:
    from inspo_core.catalog import resolve_model
    from inspo_core.grading import GradeLog
    from inspo_core.style_control import style_controlled_win_rate
    from inspo_core.eval_pipeline import check_output, resolve_models

    ckpts, world, ref_dir, baseline = resolve_models(cfg.checkpoints, None if cfg.baseline == "answers" else
                                                     cfg.baseline, cfg.cache_dir)
    sets = {k: load_prompt_set(getattr(cfg, k), world, k) for k in ("alpaca_eval", "arena_hard", "mt_bench")}
    judge_model = resolve_model(cfg.judge_model, cfg.cache_dir) if cfg.judge_model else None
    judge = make_judge(cfg.judge, world=world, path=judge_model, base_url=cfg.judge_url, model=cfg.judge_name,
                       trust_remote_code=cfg.trust_remote_code)
    judge.check()  # an unreachable judge stops here, before any sampling
    grader = _grader(cfg, world, ref_dir, judge_model)
    out_path = Path(cfg.output)
    check_output(out_path)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    gen = dict(n=cfg.n_samples, trust_remote_code=cfg.trust_remote_code, **sampling)
    gen1 = {**gen, "n": cfg.mt_samples}
    ids = {ck: describe_checkpoint(ck) for ck in ckpts}
    base_id = describe_checkpoint(baseline) if baseline is not None else {"fixed_answers": True}
    jlog = JudgementLog(out_path.with_name(out_path.stem + ".judgements.jsonl"))
    glog = GradeLog(out_path.with_name(out_path.stem + ".grades.jsonl"))
    rows = {str(ck): {} for ck in ckpts}
    ae = _pairwise(cfg, "alpaca_eval", sets["alpaca_eval"], ckpts, ids, baseline, base_id, judge, jlog, gen, sampling, log)
    for ck, (judged, calls) in ae.items():
        s = summarize(judged, n_boot=cfg.n_boot, seed=cfg.seed)
        rows[str(ck)].update(ae_wr=s["win_rate"], ae_wr_ci=s["win_rate_ci"], ae_lc=s["lc_win_rate"],
                             ae_lc_ci=s["lc_win_rate_ci"], ae_judge_calls=calls)
    ah = _pairwise(cfg, "arena_hard", sets["arena_hard"], ckpts, ids, baseline, base_id, judge, jlog, gen, sampling, log)
    all_judged = [j for judged, _ in ah.values() for j in judged]
    systems = [str(ck) for ck, (judged, _) in ah.items() for _ in judged]
    sc = style_controlled_win_rate(all_judged, systems=systems, n_boot=cfg.n_boot, seed=cfg.seed)
    for ck, (judged, calls) in ah.items():
        s = summarize(judged, n_boot=cfg.n_boot, seed=cfg.seed)
        rows[str(ck)].update(ah_wr=s["win_rate"], ah_wr_ci=s["win_rate_ci"], ah_sc=sc["sc_win_rate"][str(ck)],
                             ah_sc_ci=sc["sc_win_rate_ci"][str(ck)], ah_judge_calls=calls)
    log(f"MT-Bench: grading {len(sets['mt_bench'])} questions x {cfg.mt_samples} answers per model")
    base_mt = None if baseline is None else _grade_model(baseline, base_id, sets["mt_bench"], grader, glog, cfg, gen1,
                                                         sampling)[0]
    for ck in ckpts:
        s, calls = _grade_model(ck, ids[ck], sets["mt_bench"], grader, glog, cfg, gen1, sampling)
        rows[str(ck)].update(mt=s.mean, mt_ci=s.ci, mt_unparsed=s.unparsed, mt_per_turn=s.per_turn,
                             mt_grader_calls=calls)
    table = table_markdown(rows)
    against = "the prompt sets' fixed baseline answers" if baseline is None else str(baseline)
    doc = {"results": rows, "columns": {k: h for k, (h, _) in COLUMNS.items()}, "table": table, "baseline": against,
           "baseline_identity": base_id, "baseline_mt": base_mt.as_dict() if base_mt else None, "identities": {str(k): v for k, v in ids.items()},
           "judge": cfg.judge, "judge_identity": judge.identity(), "grader_identity": grader.identity(),
           "style_coefs": sc["style_coefs"], "style_features": sc["features"],
           "prompt_sets": {k: {"source": getattr(cfg, k), "n": len(v)} for k, v in sets.items()},
           "sampling": sampling, "n_samples": cfg.n_samples, "mt_samples": cfg.mt_samples}
    write_json(out_path, doc)
    base_note = f" (baseline {base_mt.mean:.2f})" if base_mt else ""
    out_path.with_suffix(".md").write_text(
        f"Table 2 protocol against {against} (judge {cfg.judge}, grader {cfg.grader or cfg.judge}); win rates in %, "
        f"95% bootstrap intervals over prompts; MT on 1..10{base_note}.\n\n{table}\n")
    log(table)
    log(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    return doc
