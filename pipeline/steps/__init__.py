"""Step entry points: one module per pipeline step, run by both dvc.yaml stages (``python -m pipeline.steps.<step>``) and the Prefect tasks in ``tasks/``."""
