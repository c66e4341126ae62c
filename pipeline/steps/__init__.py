"""Step entry points: one module per pipeline step, run by both dvc.yaml stages (``python -m pipeline.steps.<step>``) and the Prefect tasks in ``tasks/``.

Torch's intra-op thread count changes reduction order, hence float bits (embeddings,
heads, accuracies), so the steps that compute fix it (:func:`pinned_threads`) rather than
inherit the machine's, ``OMP_NUM_THREADS`` or a Dask worker's (Dask sets it to 1): the
same inputs give the same outputs under ``dvc repro``, ``taskvec run`` and on a cluster.
"""

from __future__ import annotations

import functools

#: torch intra-op threads of the search and evaluate steps (fine-tunes: pipeline.steps.finetune.THREADS)
EVAL_THREADS = 2


def pinned_threads(threads: int):
    """Decorator: run the step with ``threads`` torch intra-op threads, then restore the caller's count."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_num_threads(previous)  # a caller's own thread pool is its business

        return run

    return wrap
