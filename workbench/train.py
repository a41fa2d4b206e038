"""`python -m workbench train`: one training run, then its report.html beside metrics.jsonl."""

from __future__ import annotations

from inspo_core.config import TrainConfig


def run_train(cfg: TrainConfig):
    from inspo_core.trainer import Trainer
    from workbench.report import write_runs_report

    trainer = Trainer(cfg)
    result = trainer.run()
    if trainer.acc.is_main_process:
        write_runs_report(result.run_dir / "report.html", [result.run_dir])
    return result
