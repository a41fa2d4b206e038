"""`python -m workbench eval`: sample from checkpoints and a baseline, judge, write win_rates.json.

The pipeline is `inspo_core.eval_pipeline` (the app's Batch tab runs the same code); this module is the
command's entry point.
"""

from inspo_core.eval_pipeline import EvalConfig, check_output, evaluate, load_prompts, run_eval

__all__ = ["EvalConfig", "check_output", "evaluate", "load_prompts", "run_eval"]
