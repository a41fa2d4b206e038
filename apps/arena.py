"""The Gradio app: Arena (two checkpoints side by side with a judge), Batch (win rates over a
prompt set) and Dashboard (training curves from metrics.jsonl). Started by `python -m workbench app`.

All model, judging and statistics logic comes from `inspo_core`; this module only lays out the page.
"""

from __future__ import annotations

import csv
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from inspo_core.evaluate import Judgement, summarize
from inspo_core.generation import ModelCache, stream_generate
from inspo_core.judges import JUDGES, make_judge
from inspo_core.rundir import MetricsLog
from inspo_core.worlds.token import world_of

from apps.config import AppConfig


class Workbench:
    """State shared by the handlers: paths, loaded models, stop flags, the vote log."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.root = Path(cfg.runs_dir).resolve()
        self.models = ModelCache(trust_remote_code=cfg.trust_remote_code)
        self.stops: dict[str, threading.Event] = {}
        self.votes = Path(cfg.votes) if cfg.votes else self.root / "votes.jsonl"
        self.vote_lock = threading.Lock()

    # ---- discovery and path rules ---------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = {p.parent for p in self.root.rglob("config.json") if (p.parent / "model.safetensors").is_file()}
        return sorted(str(p.relative_to(self.root)) for p in found)

    def default_pair(self) -> tuple[str | None, str | None]:
        """A: the first run's final model; B: a checkpoint of another run (e.g. the reference)."""
        ckpts = self.checkpoints()
        if not ckpts:
            return None, None
        a = next((c for c in ckpts if c.endswith("final")), ckpts[0])
        b = next((c for c in ckpts if Path(c).parts[0] != Path(a).parts[0]), next((c for c in ckpts if c != a), None))
        return a, b

    def runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(str(p.parent.relative_to(self.root)) for p in self.root.rglob("metrics.jsonl"))

    def resolve(self, name: str) -> Path:
        if not name or not str(name).strip():
            raise gr.Error("Pick a checkpoint for both sides.")
        p = Path(name)
        p = (p if p.is_absolute() else self.root / p).resolve()
        if not self.cfg.allow_any_path and not p.is_relative_to(self.root):
            raise gr.Error(f"{name} is outside the runs directory {self.root}; start the app with "
                           "--allow_any_path to load it.")
        if not (p / "config.json").is_file():
            raise gr.Error(f"{name} is not a checkpoint (no config.json there).")
        return p

    def example_prompts(self, ckpt: str | None) -> list[str]:
        if self.cfg.prompts:
            path = Path(self.cfg.prompts)
            if path.suffix == ".jsonl":
                return [json.loads(x)["prompt"] for x in path.read_text().splitlines() if x.strip()]
            return [x for x in path.read_text().splitlines() if x.strip()]
        if ckpt:
            try:
                found = world_of(self.resolve(ckpt))
            except gr.Error:
                return []
            if found:
                return list(found[0].prompts)
        return []

    def judge(self, kind: str, judge_model: str, ckpt: Path):
        try:
            world = world_of(ckpt)
            path = str(self.resolve(judge_model)) if judge_model and kind in ("reward_model", "llm") else None
            return make_judge(kind, world=world[0] if world else None, path=path,
                              trust_remote_code=self.cfg.trust_remote_code)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    # ---- arena -----------------------------------------------------------------------------------
    def compare(self, a, b, prompt, temperature, top_p, max_new_tokens, seed, judge_kind, judge_model, anonymous,
                request: gr.Request):
        if not prompt or not prompt.strip():
            raise gr.Error("Write a prompt first.")
        pa, pb = self.resolve(a), self.resolve(b)
        try:
            ma, mb = self.models.get(pa), self.models.get(pb)
        except (OSError, ValueError) as e:
            raise gr.Error(f"Could not load the checkpoint: {e}") from None
        sides = [("A", a, ma), ("B", b, mb)]
        if anonymous:
            random.shuffle(sides)
        stop = self.stops.setdefault(request.session_hash if request else "-", threading.Event())
        stop.clear()
        texts = {"A": "", "B": ""}
        kw = dict(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                  seed=int(seed), stop=stop)
        streams = {slot: stream_generate(*m, prompt.strip(), **kw) for slot, (_, _, m) in
                   zip(("A", "B"), sides)}
        live = dict(streams)
        while live:  # advance both streams in turn so the answers grow side by side
            for slot in list(live):
                try:
                    texts[slot] = next(live[slot])
                except StopIteration:
                    del live[slot]
            yield texts["A"], texts["B"], "judging...", self._names(sides, anonymous)
        verdict = "stopped" if stop.is_set() else self._verdict(judge_kind, judge_model, pa, prompt.strip(),
                                                                  texts["A"], texts["B"])
        yield texts["A"], texts["B"], verdict, self._names(sides, anonymous)

    def _names(self, sides, anonymous) -> str:
        return json.dumps({"A": sides[0][1], "B": sides[1][1], "hidden": bool(anonymous)})

    def _verdict(self, kind, judge_model, ckpt: Path, prompt, a, b) -> str:
        judge = self.judge(kind, judge_model, ckpt)
        try:
            p, why = judge.compare(prompt, a, b)
        except Exception as e:  # a failing judge is reported, the app goes on
            raise gr.Error(f"The {kind} judge failed: {e}") from None
        return f"**P(A better) = {p:.3f}** ({judge.name} judge)\n\n{why}"

    def stop(self, request: gr.Request):
        ev = self.stops.get(request.session_hash if request else "-")
        if ev:
            ev.set()

    def vote(self, choice, prompt, answer_a, answer_b, names_json, verdict):
        if not answer_a and not answer_b:
            raise gr.Error("Compare first, then vote.")
        names = json.loads(names_json or "{}")
        row = {"time": time.time(), "vote": choice, "prompt": prompt, "a": names.get("A"), "b": names.get("B"),
               "answer_a": answer_a, "answer_b": answer_b, "anonymous": names.get("hidden", False),
               "verdict": verdict}
        with self.vote_lock:
            self.votes.parent.mkdir(parents=True, exist_ok=True)
            with open(self.votes, "a") as f:
                f.write(json.dumps(row) + "\n")
        return f"Vote recorded: **{choice}**. A was `{names.get('A')}`, B was `{names.get('B')}`."

    # ---- batch -----------------------------------------------------------------------------------
    def batch(self, a, b, judge_kind, judge_model, n, temperature, top_p, max_new_tokens, seed,
              progress=gr.Progress()):
        from inspo_core.evaluate import generate_responses

        pa, pb = self.resolve(a), self.resolve(b)
        prompts = self.example_prompts(a)
        if not prompts:
            raise gr.Error("No prompt set: use world checkpoints or start the app with --prompts FILE.")
        gen = dict(n=int(n), temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                   seed=int(seed), trust_remote_code=self.cfg.trust_remote_code)
        progress(0.05, desc="sampling A")
        ra = generate_responses(pa, prompts, **gen)
        progress(0.35, desc="sampling B")
        rb = generate_responses(pb, prompts, **gen)
        judge = self.judge(judge_kind, judge_model, pa)
        judged, rows = [], []
        total = len(prompts) * int(n)
        for i, p in enumerate(prompts):
            for k in range(int(n)):
                try:
                    prob, why = judge.compare(p, ra[i][k], rb[i][k])
                except Exception as e:
                    raise gr.Error(f"The {judge_kind} judge failed: {e}") from None
                judged.append(Judgement(f"{i}:{k}", p, ra[i][k], rb[i][k], prob, why))
                rows.append([p, ra[i][k], rb[i][k], round(prob, 4)])
                progress(0.65 + 0.35 * len(judged) / total, desc="judging")
        s = summarize(judged, n_boot=500)
        md = (f"**win rate of A: {s['win_rate']:.3f}** (95% CI {s['win_rate_ci'][0]:.3f}-{s['win_rate_ci'][1]:.3f}); "
              f"length-controlled {s['lc_win_rate']:.3f}; {s['wins']} wins, {s['ties']} ties, {s['losses']} losses "
              f"over {s['n']} comparisons")
        out = Path(tempfile.mkdtemp(prefix="inspo-batch-")) / "batch.csv"
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "answer_a", "answer_b", "p_a_better"])
            w.writerows(rows)
        return md, rows, str(out)

    # ---- dashboard -------------------------------------------------------------------------------
    def dashboard(self, selected):
        from inspo_core.plots import training_curves

        runs = []
        for name in selected or []:
            d = self.resolve_run(name)
            conf = d / "config.yaml"
            strategy = "?"
            if conf.is_file():
                import yaml

                strategy = (yaml.safe_load(conf.read_text()) or {}).get("strategy", "?")
            runs.append({"name": name, "strategy": strategy, "run_dir": str(d)})
        fig = training_curves(runs)
        config = (self.resolve_run(selected[0]) / "config.yaml").read_text() if selected else ""
        last = MetricsLog(self.resolve_run(selected[0]) / "metrics.jsonl").rows()[-1:] if selected else []
        return fig, config, json.dumps(last[0] if last else {}, indent=1)

    def resolve_run(self, name: str) -> Path:
        p = (self.root / name).resolve()
        if not p.is_relative_to(self.root) or not (p / "metrics.jsonl").is_file():
            raise gr.Error(f"{name} is not a run under {self.root}")
        return p


def build_app(cfg: AppConfig) -> gr.Blocks:
    wb = Workbench(cfg)
    ckpts = wb.checkpoints()
    first, second = wb.default_pair()
    runs = wb.runs()
    with gr.Blocks(title="InSPO Workbench") as app:
        gr.Markdown("# InSPO Workbench\nDPO and INS checkpoints side by side. Answers come from the prompt alone, "
                    "as the models are deployed.")
        with gr.Tab("Arena"):
            with gr.Row():
                a = gr.Dropdown(ckpts, value=first, label="Checkpoint A", allow_custom_value=True)
                b = gr.Dropdown(ckpts, value=second, label="Checkpoint B", allow_custom_value=True)
            examples = gr.Dropdown(wb.example_prompts(first), label="Example prompts",
                                   value=None, allow_custom_value=False)
            prompt = gr.Textbox(label="Prompt", lines=3)
            with gr.Accordion("Generation", open=False):
                with gr.Row():
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top p")
                    max_new = gr.Slider(1, 1024, value=64, step=1, label="Max new tokens")
                    seed = gr.Number(value=0, precision=0, label="Seed")
            with gr.Row():
                judge_kind = gr.Dropdown(list(JUDGES), value="oracle", label="Judge")
                judge_model = gr.Textbox(label="Judge model (reward model or judge LM)", placeholder="path under runs")
                anonymous = gr.Checkbox(label="Anonymous (hide which side is which until the vote)", value=False)
            with gr.Row():
                go = gr.Button("Compare", variant="primary")
                stop = gr.Button("Stop")
            with gr.Row():
                out_a = gr.Textbox(label="Answer A", lines=6)
                out_b = gr.Textbox(label="Answer B", lines=6)
            verdict = gr.Markdown(label="Verdict")
            names = gr.Textbox(visible=False)
            with gr.Row():
                vote_buttons = [gr.Button(v) for v in ("A better", "B better", "Tie", "Both bad")]
            vote_msg = gr.Markdown()
            examples.change(lambda x: x or gr.update(), examples, prompt)
            a.change(lambda x: gr.update(choices=wb.example_prompts(x), value=None), a, examples)
            event = go.click(wb.compare, [a, b, prompt, temperature, top_p, max_new, seed, judge_kind, judge_model,
                                          anonymous], [out_a, out_b, verdict, names])
            stop.click(wb.stop, None, None, cancels=[event])
            for btn in vote_buttons:
                btn.click(wb.vote, [btn, prompt, out_a, out_b, names, verdict], vote_msg)
        with gr.Tab("Batch"):
            with gr.Row():
                ba = gr.Dropdown(ckpts, value=first, label="Checkpoint A", allow_custom_value=True)
                bb = gr.Dropdown(ckpts, value=second, label="Checkpoint B", allow_custom_value=True)
            with gr.Row():
                bjudge = gr.Dropdown(list(JUDGES), value="oracle", label="Judge")
                bjudge_model = gr.Textbox(label="Judge model")
                bn = gr.Slider(1, 100, value=10, step=1, label="Samples per prompt")
            brun = gr.Button("Run batch", variant="primary")
            bsummary = gr.Markdown()
            btable = gr.Dataframe(headers=["prompt", "answer_a", "answer_b", "p_a_better"], label="Per prompt")
            bcsv = gr.File(label="CSV")
            brun.click(wb.batch, [ba, bb, bjudge, bjudge_model, bn, temperature, top_p, max_new, seed],
                       [bsummary, btable, bcsv])
        with gr.Tab("Dashboard"):
            sel = gr.Dropdown(runs, value=runs[:4], multiselect=True, label="Runs")
            live = gr.Checkbox(label="Refresh every 5 s while a run trains", value=True)
            plot = gr.Plot(label="Training curves (INS solid, baseline dashed)")
            with gr.Row():
                conf = gr.Code(label="config.yaml of the first run", language="yaml")
                last = gr.Code(label="latest metrics row", language="json")
            timer = gr.Timer(5.0)
            sel.change(wb.dashboard, sel, [plot, conf, last])
            app.load(wb.dashboard, sel, [plot, conf, last])
            timer.tick(lambda s, on: wb.dashboard(s) if on else (gr.update(), gr.update(), gr.update()),
                       [sel, live], [plot, conf, last])
            live.change(lambda on: gr.Timer(active=on), live, timer)
    app.queue(default_concurrency_limit=1)  # one generation at a time; other users wait in the queue
    return app


def launch(cfg: AppConfig) -> None:
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[inspo] warning: binding to {cfg.host}; anyone who can reach it can use the app", flush=True)
    app = build_app(cfg)
    app.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True)
