"""InSPO Workbench core library: objectives, conditioning, log-probs, training, worlds, evaluation."""

__version__ = "0.1.0"
