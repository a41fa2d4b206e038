"""A real-text world: SmolLM2-135M-Instruct as pi_ref, natural-language prompts, and an oracle
nobody here wrote.

The setting of the DPO paper's controlled-sentiment experiment (GPT-2 and a sentiment classifier),
with an instruct model: prompts ask for a one-sentence review or opinion of a film, a restaurant, a
product or a place (templates x subjects, below); responses are sampled from pi_ref; the reward
behind the preference is VADER's compound sentiment score (`vadersentiment`, a lexicon-based
scorer from its authors' wheel) in [-1, 1]. Families:

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


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:  # pragma: no cover - a missing optional dependency
        raise ValueError("the sentiment world needs the `vadersentiment` package (pip install vadersentiment)") from e
    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER's compound score in [-1, 1] (0 for an empty text)."""
    return float(_analyzer().polarity_scores(text)["compound"]) if text.strip() else 0.0


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


@dataclass(frozen=True)
class SentimentWorldConfig:
    family: str = "bradley_terry"
    strength: float = 4.0
    delta: float = 0.3  # salience discount of the non-salient attribute
    model: str = "smollm2"  # pi_ref: a catalog name, a directory or a hub name
    n_train_prompts: int = 180  # the rest of the prompts are held out for evaluation
    pairs_per_prompt: int = 2
    max_new_tokens: int = 48
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r}; valid: {', '.join(FAMILIES)}")
        if not 1 <= self.n_train_prompts < len(all_prompts()):
            problems.append(f"n_train_prompts={self.n_train_prompts} must be in 1..{len(all_prompts()) - 1}")
        if problems:
            raise ValueError("invalid sentiment world: " + "; ".join(problems))

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"kind": "sentiment", **asdict(self)}, sort_keys=True).encode()).hexdigest()[:16]


class SentimentWorld:
    kind = "sentiment"

    def __init__(self, cfg: SentimentWorldConfig):
        self.cfg = cfg
        import random

        prompts = all_prompts()
        order = list(range(len(prompts)))
        random.Random(cfg.seed).shuffle(order)
        self.train_prompts = [prompts[i] for i in sorted(order[: cfg.n_train_prompts])]
        self.eval_prompts = [prompts[i] for i in sorted(order[cfg.n_train_prompts:])]
        self.prompts = self.eval_prompts  # what evaluation and the app's examples use

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
    from inspo_core.generation import sample_batch
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
    texts = sample_batch(model, tok, [builder.generation_ids(p) for p in world.train_prompts], n=2 * k, seed=seed,
                         temperature=1.0, top_p=1.0, max_new_tokens=world.cfg.max_new_tokens)
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
