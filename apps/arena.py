"""The Gradio app: Arena (two checkpoints side by side with a judge), Batch (win rates over a
prompt set) and Dashboard (training curves from metrics.jsonl). Started by `python -m workbench app`.

All model, judging and statistics logic comes from `inspo_core`; this module only lays out the page.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import random
import threading
import time
from pathlib import Path

import gradio as gr

from inspo_core.catalog import CATALOG, resolve_model
from inspo_core.generation import ModelCache, stream_generate
from inspo_core.judges import available_judges, make_judge
from inspo_core.models import is_model_dir
from inspo_core.rundir import RunDir
from inspo_core.worlds import world_of

from apps.config import AppConfig


NO_JUDGE = "none (vote only)"
VOTES = ("A better", "B better", "Tie", "Both bad")


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
        found |= {p.parent for p in self.root.rglob("adapter_config.json")  # LoRA runs' adapters
                  if (p.parent / "adapter_model.safetensors").is_file()}
        return sorted(str(p.relative_to(self.root)) for p in found) + self.named_models()

    def default_pair(self) -> tuple[str | None, str | None]:
        """A: the first run's final model; B: its starting model when that is a named model (the base
        model of a LoRA run), else a checkpoint of another run (e.g. the reference)."""
        ckpts = self.checkpoints()
        if not ckpts:
            return None, None
        a = next((c for c in ckpts if c.endswith("final")), ckpts[0])
        run = RunDir.of_model(self.root / a)
        start = Path(str(run.read_config().get("resolved_model", ""))) if run else None
        for name in self.named_models():
            if start is not None and start.name == name and start.parent.name == "models":
                return a, name
        b = next((c for c in ckpts if Path(c).parts[0] != Path(a).parts[0]), next((c for c in ckpts if c != a), None))
        return a, b

    def runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(str(p.parent.relative_to(self.root)) for p in self.root.rglob("metrics.jsonl"))

    def named_models(self) -> list[str]:
        """Catalog models already made into checkpoints in the cache (pickable by name)."""
        return [n for n in CATALOG if (Path(self.cfg.cache_dir) / "models" / n / "config.json").is_file()]

    def resolve(self, name: str) -> Path:
        if not name or not str(name).strip():
            raise gr.Error("Pick a checkpoint for both sides.")
        if "\x00" in str(name):
            raise gr.Error(f"{name!r} contains a NUL byte, which no path can hold: pick a checkpoint from the list "
                           "or type its path again.")
        if name in CATALOG:  # a named model: materialised by the workbench itself, in its cache
            try:
                return Path(resolve_model(name, self.cfg.cache_dir, log=lambda m: None))
            except ValueError as e:
                raise gr.Error(str(e)) from None
        p = Path(name)
        p = (p if p.is_absolute() else self.root / p).resolve()
        if not self.cfg.allow_any_path and not p.is_relative_to(self.root):
            raise gr.Error(f"{name} is outside the runs directory {self.root}; start the app with "
                           "--allow_any_path to load it.")
        if not is_model_dir(p):
            raise gr.Error(f"{name} is not a checkpoint (no config.json or LoRA adapter_config.json there).")
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

    def judge_choices(self, ckpt: str | None, judge_model: str | None = None) -> tuple[list[str], str]:
        """(judges that can run for checkpoint `ckpt`, the default): the oracle only for world
        checkpoints, model judges once a judge model is named, the HTTP judge when its URL is set;
        "none" (vote only) always."""
        world = None
        if ckpt:
            try:
                world = world_of(self.resolve(ckpt))
            except gr.Error:
                world = None
        names = available_judges(world=world, judge_model=judge_model) + [NO_JUDGE]
        return names, ("oracle" if "oracle" in names else NO_JUDGE)

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
        """Streams (answer A, answer B, verdict, session state). Which checkpoint is on which side stays
        in the session state on the server: the browser never receives it before the vote."""
        if not prompt or not prompt.strip():
            raise gr.Error("Write a prompt first.")
        pa, pb = self.resolve(a), self.resolve(b)
        try:  # the fingerprint of the weights that answer goes into the vote with the name
            (ma, fa), (mb, fb) = self.models.get_with_fingerprint(pa), self.models.get_with_fingerprint(pb)
        except (OSError, ValueError) as e:
            raise gr.Error(f"Could not load the checkpoint: {e}") from None
        sides = [(a, ma, fa), (b, mb, fb)]
        if anonymous:
            random.shuffle(sides)
        stop = self.stops.setdefault(request.session_hash if request else "-", threading.Event())
        stop.clear()
        texts = {"A": "", "B": ""}
        kw = dict(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                  seed=int(seed), stop=stop)
        try:
            streams = {slot: stream_generate(*m, prompt.strip(), **kw) for slot, (_, m, _) in zip(("A", "B"), sides)}
        except ValueError as e:  # e.g. a prompt longer than the model's context
            raise gr.Error(str(e)) from None
        live = dict(streams)
        state = {"names": {"A": sides[0][0], "B": sides[1][0]}, "fingerprints": {"A": sides[0][2], "B": sides[1][2]},
                 "anonymous": bool(anonymous), "prompt": prompt.strip(),
                 "answers": texts, "verdict": "", "voted": False}
        while live:  # advance both streams in turn so the answers grow side by side
            for slot in list(live):
                try:
                    texts[slot] = next(live[slot])
                except StopIteration:
                    del live[slot]
                except ValueError as e:
                    raise gr.Error(str(e)) from None
            yield texts["A"], texts["B"], "judging...", None
        if stop.is_set():
            verdict = "stopped"
        elif judge_kind == NO_JUDGE:
            verdict = "No judge: vote below."
        else:
            verdict = self._verdict(judge_kind, judge_model, pa, prompt.strip(), texts["A"], texts["B"])
        state["verdict"] = verdict
        yield texts["A"], texts["B"], verdict, state

    def _verdict(self, kind, judge_model, ckpt: Path, prompt, a, b) -> str:
        """The judge's verdict; a judge that cannot run or fails is reported here, and the answers stay."""
        try:
            judge = self.judge(kind, judge_model, ckpt)
            p, why = judge.compare(prompt, a, b)
        except Exception as e:  # noqa: BLE001  any judge failure is shown, never raised over the answers
            return f"**The {kind} judge failed:** {e}"
        return f"**P(A better) = {p:.3f}** ({judge.name} judge)\n\n{why}"

    def stop(self, request: gr.Request):
        ev = self.stops.get(request.session_hash if request else "-")
        if ev:
            ev.set()

    def vote(self, choice: str, state: dict | None):
        """Log a vote for the comparison held in this session's state (names, prompt, answers and
        verdict come from the server, never from the browser); one vote per comparison."""
        if choice not in VOTES:
            raise gr.Error(f"Unknown vote {choice!r}.")
        if not state or not any(state["answers"].values()):
            raise gr.Error("Compare first, then vote.")
        if state["voted"]:
            raise gr.Error("This comparison already has a vote; compare again to vote again.")
        names, fps = state["names"], state["fingerprints"]
        row = {"time": time.time(), "vote": choice, "prompt": state["prompt"], "a": names["A"], "b": names["B"],
               "a_fingerprint": fps["A"], "b_fingerprint": fps["B"],
               "answer_a": state["answers"]["A"], "answer_b": state["answers"]["B"], "anonymous": state["anonymous"],
               "verdict": state["verdict"]}
        with self.vote_lock:
            self.votes.parent.mkdir(parents=True, exist_ok=True)
            with open(self.votes, "a") as f:
                f.write(json.dumps(row) + "\n")
        state["voted"] = True
        return f"Vote recorded: **{choice}**. A was `{names['A']}`, B was `{names['B']}`.", state

    # ---- batch -----------------------------------------------------------------------------------
    def batch(self, a, b, judge_kind, judge_model, n, temperature, top_p, max_new_tokens, seed,
              progress=gr.Progress()):
        """`workbench eval` of A against B as baseline, on the app's prompt set: the same sampling, judgement
        keys, judgement log and reuse, written to its own file (`batch_path`), so a Batch result and an `eval`
        result with the same settings are the same numbers."""
        from inspo_core.eval_pipeline import EvalConfig, evaluate

        pa, pb = self.resolve(a), self.resolve(b)
        if not self.example_prompts(a):
            raise gr.Error("No prompt set: use world checkpoints or start the app with --prompts FILE.")
        if not judge_kind or judge_kind == NO_JUDGE:
            raise gr.Error("A batch needs a judge: pick one (the oracle for world checkpoints, or a judge model).")
        uses_model = judge_kind in ("reward_model", "llm")
        if uses_model and not judge_model:
            raise gr.Error(f"The {judge_kind} judge needs a judge model: name one in the Judge model field.")
        out = self.batch_path(pa, pb)
        try:
            cfg = EvalConfig(checkpoints=[str(pa)], baseline=str(pb), prompts=self.cfg.prompts or "world",
                             judge=judge_kind, judge_model=str(self.resolve(judge_model)) if uses_model else None,
                             n_samples=int(n), temperature=float(temperature), top_p=float(top_p),
                             max_new_tokens=int(max_new_tokens), seed=int(seed), output=str(out),
                             trust_remote_code=self.cfg.trust_remote_code, cache_dir=self.cfg.cache_dir)
            doc, judged = evaluate(cfg, log=lambda m: None, progress=lambda f, what: progress(f, desc=what))
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a judge that fails mid-way: its finished judgements are kept
            raise gr.Error(f"The {judge_kind} judge failed: {e} (finished judgements are kept in {out.parent})") from None
        (ck, r), = doc["results"].items()
        rows = [[j.prompt, j.a, j.b, round(j.prob, 4)] for j in judged[ck]]
        md = (f"**win rate of A: {r['win_rate']:.3f}** (95% CI {r['win_rate_ci'][0]:.3f}-{r['win_rate_ci'][1]:.3f}); "
              f"length-controlled {r['lc_win_rate']:.3f}; {r['wins']} wins, {r['ties']} ties, {r['losses']} losses "
              f"over {r['n']} comparisons ({r['judge_calls']} judged now, {r['reused']} reused); written to `{out}`")
        csv_path = out.with_suffix(".csv")
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "answer_a", "answer_b", "p_a_better"])
            w.writerows(rows)
        return md, rows, str(csv_path)

    def batch_path(self, a: Path, b: Path) -> Path:
        """Where the Batch tab writes A-vs-B: `<runs_dir>/batch/<A>__vs__<B>.json` (names relative to runs_dir
        where they are inside it), with its judgements beside it."""
        def name(p: Path) -> str:
            try:
                p = p.resolve().relative_to(self.root.resolve())
            except ValueError:
                pass
            return "-".join(x for x in p.parts if x not in ("/", "")) or "model"

        out = self.root / "batch" / f"{name(a)}__vs__{name(b)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    # ---- dashboard -------------------------------------------------------------------------------
    def dashboard(self, selected):
        from inspo_core.plots import training_curves

        runs = [{"name": name, "strategy": RunDir(self.resolve_run(name)).read_config().get("strategy", "?"),
                 "run_dir": str(self.resolve_run(name))} for name in selected or []]
        fig = training_curves(runs)
        first = RunDir(self.resolve_run(selected[0])) if selected else None
        config = first.config_path.read_text() if first and first.config_path.is_file() else ""
        last = first.metrics.rows()[-1:] if first else []
        return fig, config, json.dumps(last[0] if last else {}, indent=1)

    def resolve_run(self, name: str) -> Path:
        if "\x00" in str(name):
            raise gr.Error(f"{name!r} contains a NUL byte, which no path can hold.")
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
            judges, default_judge = wb.judge_choices(first)
            with gr.Row():
                judge_kind = gr.Dropdown(judges, value=default_judge, label="Judge")
                judge_model = gr.Textbox(label="Judge model (reward model or judge LM)", placeholder="path under runs")
                anonymous = gr.Checkbox(label="Anonymous (hide which side is which until the vote)", value=False)
            with gr.Row():
                go = gr.Button("Compare", variant="primary")
                stop = gr.Button("Stop")
            with gr.Row():
                out_a = gr.Textbox(label="Answer A", lines=6)
                out_b = gr.Textbox(label="Answer B", lines=6)
            verdict = gr.Markdown(label="Verdict")
            session = gr.State(None)  # the comparison (who is A and B, answers): kept on the server
            with gr.Row():
                vote_buttons = [gr.Button(v) for v in VOTES]
            vote_msg = gr.Markdown()
            examples.change(lambda x: x or gr.update(), examples, prompt)

            def on_checkpoint(x, jm):
                names, default = wb.judge_choices(x, jm)
                return gr.update(choices=wb.example_prompts(x), value=None), gr.update(choices=names, value=default)

            a.change(on_checkpoint, [a, judge_model], [examples, judge_kind])
            judge_model.change(lambda x, jm: gr.update(choices=wb.judge_choices(x, jm)[0]), [a, judge_model],
                               judge_kind)
            event = go.click(wb.compare, [a, b, prompt, temperature, top_p, max_new, seed, judge_kind, judge_model,
                                          anonymous], [out_a, out_b, verdict, session], api_name="compare")
            stop.click(wb.stop, None, None, cancels=[event])
            for btn in vote_buttons:
                btn.click(lambda state, v=btn.value: wb.vote(v, state), [session], [vote_msg, session],
                          api_name=False)
        with gr.Tab("Batch"):
            with gr.Row():
                ba = gr.Dropdown(ckpts, value=first, label="Checkpoint A", allow_custom_value=True)
                bb = gr.Dropdown(ckpts, value=second, label="Checkpoint B", allow_custom_value=True)
            with gr.Row():
                bjudge = gr.Dropdown([j for j in judges if j != NO_JUDGE] or ["oracle"],
                                     value=default_judge if default_judge != NO_JUDGE else None, label="Judge")
                bjudge_model = gr.Textbox(label="Judge model")
                bn = gr.Slider(1, 100, value=10, step=1, label="Samples per prompt")
            brun = gr.Button("Run batch", variant="primary")
            bsummary = gr.Markdown()
            btable = gr.Dataframe(headers=["prompt", "answer_a", "answer_b", "p_a_better"], label="Per prompt")
            bcsv = gr.File(label="CSV")
            brun.click(wb.batch, [ba, bb, bjudge, bjudge_model, bn, temperature, top_p, max_new, seed],
                       [bsummary, btable, bcsv])

            def batch_judges(x, jm):
                names = [j for j in wb.judge_choices(x, jm)[0] if j != NO_JUDGE]
                return gr.update(choices=names, value=names[0] if names else None)

            ba.change(batch_judges, [ba, bjudge_model], bjudge)
            bjudge_model.change(batch_judges, [ba, bjudge_model], bjudge)
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
    app.queue(default_concurrency_limit=1, max_size=16)  # one generation at a time; at most 16 wait, others are told to retry
    return app


def host_warning(host: str) -> str | None:
    """The warning for binding to `host`, None for a loopback address (127.0.0.0/8, ::1, localhost),
    which only this machine can reach."""
    h = host.strip().strip("[]").rstrip(".").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return None
    try:
        if ipaddress.ip_address(h).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to any interface
        pass
    return f"[inspo] warning: binding to {host}; anyone who can reach it can use the app"


def launch(cfg: AppConfig) -> None:
    if (warning := host_warning(cfg.host)) is not None:
        print(warning, flush=True)
    app = build_app(cfg)
    app.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True)
