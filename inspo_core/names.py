"""What a config may name, without importing torch: every registry's names and the rules a config is checked by.

`inspo_core.config` validates and documents a config from this module alone, so `python -m workbench <command>
--help` and a config's errors come without loading torch. The registries holding the code are built from these
entries and nothing else: `objectives.OBJECTIVES` (one loss function per `OBJECTIVE_SPECS` entry),
`strategies.STRATEGIES` (`STRATEGY_SPECS`), `engines.ENGINES` (`ENGINE_SUMMARIES`), and the layout names
`CONTEXT_FORMATS`, `PROMPT_FORMATS` (conditioning), `PACKINGS` (scoring), `REF_CONDITIONING` (strategies);
`judges.JUDGES` (`JUDGE_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    needs_reference: bool
    hparams: dict[str, float]  # name -> default
    summary: str
    citation: str
    needs_lengths: bool = False  # uses the target token counts (|y|)
    # normalises by |y| itself (a per-token term or margin): `length_normalize` is refused for it,
    # since dividing again would normalise twice
    normalizes_itself: bool = False
    # reads a batch-level reference point (KTO's z_ref): the per-example losses of a batch are
    # coupled through one detached scalar, and `kl_logratios` may be passed in
    batch_reference_point: bool = False

    @property
    def accepts_length_normalize(self) -> bool:
        return not self.normalizes_itself


OBJECTIVE_SPECS: dict[str, ObjectiveSpec] = {
    o.name: o
    for o in [
        ObjectiveSpec("dpo", True, {"beta": 0.1, "label_smoothing": 0.0},
                      "DPO; label_smoothing > 0 gives conservative DPO", "Rafailov et al. 2023; Table 1"),
        ObjectiveSpec("ipo", True, {"beta": 0.1, "tau": 0.1},
                      "IPO: squared distance of the log-ratio margin to 1/(2 tau)", "Azar et al. 2024; Table 1"),
        ObjectiveSpec("rdpo", True, {"beta": 0.1, "alpha": 0.1},
                      "R-DPO: DPO with a length term alpha (|y_w| - |y_l|)", "Park et al. 2024; Table 1",
                      needs_lengths=True),
        ObjectiveSpec("orpo", False, {"beta": 0.1, "lam": 0.1},
                      "ORPO: NLL plus lam times the odds-ratio loss (reference-free)", "Hong et al. 2024; Table 1",
                      needs_lengths=True, normalizes_itself=True),
        ObjectiveSpec("simpo", False, {"beta": 2.0, "gamma": 1.0},
                      "SimPO: length-normalised margin with target margin gamma (reference-free)",
                      "Meng et al. 2024; Table 1", needs_lengths=True, normalizes_itself=True),
        ObjectiveSpec("cpo", False, {"beta": 0.1, "lam": 0.1},
                      "CPO: reference-free DPO margin plus lam times NLL", "Xu et al. 2024a",
                      needs_lengths=True, normalizes_itself=True),
        ObjectiveSpec("slic", False, {"beta": 0.1, "gamma": 1.0, "lam": 0.1},
                      "SLiC-HF: calibration hinge with margin gamma plus lam times NLL", "Zhao et al. 2023",
                      needs_lengths=True, normalizes_itself=True),
        ObjectiveSpec("rrhf", False, {"beta": 0.1, "lam": 1.0},
                      "RRHF: ranking hinge on mean log-probs plus lam times NLL", "Yuan et al. 2023",
                      needs_lengths=True, normalizes_itself=True),
        ObjectiveSpec("hinge", True, {"beta": 0.1},
                      "hinge on the DPO margin, max(0, 1 - beta * margin)", "Liu et al. 2024 (RSO)"),
        ObjectiveSpec("robust", True, {"beta": 0.1, "label_smoothing": 0.1},
                      "robust DPO, unbiased under label noise rate label_smoothing", "Chowdhury et al. 2024"),
        ObjectiveSpec("kto", True, {"beta": 0.1, "lambda_d": 1.0, "lambda_u": 1.0},
                      "KTO: each pair as one desirable and one undesirable example against a batch reference "
                      "point z_ref, weights lambda_d / lambda_u", "Ethayarajh et al. 2024",
                      batch_reference_point=True),
    ]
}

HPARAM_NAMES: tuple[str, ...] = tuple(sorted({k for o in OBJECTIVE_SPECS.values() for k in o.hparams}))


@dataclass(frozen=True)
class StrategySpec:
    name: str
    summary: str
    uses_weight: bool = False
    imitate: bool = False  # each term is -log pi(chosen view): no preference, no reference, no objective


STRATEGY_SPECS: dict[str, StrategySpec] = {
    s.name: s
    for s in [
        StrategySpec("none", "plain DPO-family training: log pi(y_w|x), log pi(y_l|x)"),
        StrategySpec("symmetric", "InSPO (eq. 10/16): log pi(y_w|x,y_l) and log pi(y_l|x,y_w)"),
        StrategySpec("one_sided", "only the chosen is conditioned: log pi(y_w|x,y_l), log pi(y_l|x)"),
        StrategySpec("one_sided_paper", "Table 4 as printed: log pi(y_w|x,y_l), log pi(y_l|x,y_l)"),
        StrategySpec("averaged", "(1-w) * none + w * symmetric (Table 4 'Averaged', w=0.5)", uses_weight=True),
        StrategySpec("distill", "context distillation: -log pi(y|x) of the chosen, a conditioned teacher's sample "
                     "(data from workbench.distill; the objective is not used)", imitate=True),
    ]
}

REF_CONDITIONING = ("plain", "conditioned")
CONTEXT_FORMATS = ("sep", "raw", "template")
# how a prompt given as a plain string is rendered: `chat` as one user turn with the tokenizer's chat
# template and its generation prompt (what an instruct model expects), `plain` as the text itself
# (with the tokenizer's BOS), `auto` chat when the tokenizer has a template, else plain. Training and
# generation use the same rule, so the deployed model sees prompts as it was trained on them.
PROMPT_FORMATS = ("auto", "chat", "plain")
PACKINGS = ("padded", "tree")

# pairwise judges (`judges.JUDGES` holds their code) and the single-answer graders of MT-Bench (`workbench.protocol`)
JUDGE_NAMES = ("oracle", "reward_model", "llm", "http")
GRADER_NAMES = ("oracle", "llm", "http")
ENGINE_SUMMARIES: dict[str, str] = {
    "none": "every process holds the whole model (DDP when launched on several)",
    "fsdp2": "parameters, gradients and optimizer state sharded per decoder layer (torch FSDP2, CPU or GPU)",
    "zero3": "DeepSpeed ZeRO-3 through accelerate (pip install deepspeed)",
}


def get_objective_spec(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVE_SPECS:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVE_SPECS)}")
    return OBJECTIVE_SPECS[name]


def resolve_hparams(name: str, hparams: dict[str, float]) -> dict[str, float]:
    """Defaults of objective `name` overridden by `hparams`; unknown names raise ValueError.

    Hyperparameters that exist for some other objective but not this one are ignored, so a
    config can carry `beta`, `gamma`, ... for a sweep across objectives.
    """
    obj = get_objective_spec(name)
    unknown = sorted(set(hparams) - set(HPARAM_NAMES))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for objective {name!r}; valid names: "
            f"{', '.join(HPARAM_NAMES)} ({name} uses {', '.join(obj.hparams)})"
        )
    out = dict(obj.hparams)
    out.update({k: float(v) for k, v in hparams.items() if k in obj.hparams})
    problems = [f"{k}={v} must be > 0" for k, v in out.items() if k in ("beta", "tau") and v <= 0]
    problems += [f"{k}={v} must be >= 0" for k, v in out.items() if k in ("lambda_d", "lambda_u") and v < 0]
    if "label_smoothing" in out and not 0 <= out["label_smoothing"] < 0.5:
        problems.append(f"label_smoothing={out['label_smoothing']} must be in [0, 0.5)")
    if problems:
        raise ValueError(f"objective {name!r}: " + "; ".join(problems))
    return out


def check_length_normalize(name: str, length_normalize: bool) -> None:
    obj = get_objective_spec(name)
    if length_normalize and not obj.accepts_length_normalize:
        ok = ", ".join(n for n, o in OBJECTIVE_SPECS.items() if o.accepts_length_normalize)
        raise ValueError(
            f"length_normalize=true with objective {name!r}: {name} already divides by |y| in its own "
            f"formula, so the flag would normalise twice; drop it (it applies to: {ok})"
        )
