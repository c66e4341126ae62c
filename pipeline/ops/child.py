"""Run a module as ``__main__`` in a process that dies with its parent.

    python -m pipeline.ops.child PARENT_PID SIGNAL MODULE [ARGS…]

Arms ``prctl(PR_SET_PDEATHSIG, SIGNAL)`` (Linux) and then checks that
``PARENT_PID`` is still its parent (it may have died between fork and the
prctl), so a fine-tune or the Prefect API server never outlives the
``taskvec run`` that started it, even when that one is SIGKILLed. Done in the
child itself rather than in a ``preexec_fn``, which is unsafe in the
multi-threaded parent (Prefect's task threads).

With ``TASKVEC_FINETUNE_PROGRESS=1`` a transformers ``TrainerCallback`` is
added to every Trainer of the child that prints one line per logging step on
stderr (``taskvec-progress step=S/N loss=L``), which the parent relays,
throttled, to the console (see :mod:`tasks.finetune`).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def arm(parent_pid: int, sig: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:  # pragma: no cover - prctl does not fail for a valid signal
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(128 + sig)  # the parent is already gone


def progress_callback() -> None:
    """Add a line-per-log progress printer to every transformers Trainer of this process."""
    import transformers.trainer as T
    from transformers import TrainerCallback

    class _Lines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"taskvec-progress step={state.global_step}/{state.max_steps} loss={float(logs['loss']):.4f}", file=sys.stderr, flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            print(f"taskvec-progress step={state.global_step}/{state.max_steps} done", file=sys.stderr, flush=True)

    T.DEFAULT_CALLBACKS = [*T.DEFAULT_CALLBACKS, _Lines]


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit("usage: python -m pipeline.ops.child PARENT_PID SIGNAL MODULE [ARGS…]")
    arm(int(argv[0]), int(getattr(signal, argv[1])))
    module, args = argv[2], argv[3:]
    if os.environ.get("TASKVEC_FINETUNE_PROGRESS") == "1":
        progress_callback()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
