"""Gradio front-ends of InSPO Workbench."""
