"""InSPO Workbench front-end: `python -m workbench <command>`."""
