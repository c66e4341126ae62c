"""The pipeline layer on top of the core library ``taskvec``.

* :mod:`pipeline.params` — the params.yaml schema (the core's plus the pipeline's sections) and the output layout;
* :mod:`pipeline.steps` — one entry point per step, shared by dvc.yaml stages and the Prefect tasks in ``tasks/``;
* :mod:`pipeline.ops` — operations on registered models: registry, tracking, services, audit, promotion, rollback;
* :mod:`pipeline.cli` — the full ``taskvec`` command (core commands + pipeline commands).
"""
