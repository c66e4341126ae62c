"""``compress``: store a task vector sparsified (top-k or DARE) and/or in float16/bfloat16.

Vectors are compressed one tensor at a time (a sparse vector is small by
construction, and is collected before it is written).
"""

from __future__ import annotations

import math
import os

import torch

from taskvec import algebra
from taskvec.errors import TaskvecError
from taskvec.io import check_output
from taskvec.streaming import progress_bar as _progress
from taskvec.streaming import check_fits, single_threaded
from taskvec.vector import VectorFile, VectorHeader, VectorWriter, write_sparse_vector


@single_threaded
def compress(
    vector: str | os.PathLike,
    out: str | os.PathLike,
    *,
    density: float | None = None,
    drop: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    force: bool = False,
) -> dict:
    """Store a vector sparsified (top-k by magnitude, or DARE) and/or in float16/bfloat16.

    Returns the reconstruction error against the input: relative L2
    ``‖τ − τ̂‖ / ‖τ‖``, maximum absolute error, kept fraction and sizes.
    """
    if density is not None and drop is not None:
        raise TaskvecError("choose one sparsifier: --density (top-k) or --drop (DARE)")
    if density is not None:
        algebra.check_density(density)
    if drop is not None:
        algebra.check_drop(drop)
    with VectorFile(vector) as vf:
        dest = check_output(out, [vector], kind="file", force=force)
        storage: dict = {"kind": "dense"}
        if density is not None:
            storage = {"kind": "sparse", "method": "topk", "density": density}
        elif drop is not None:
            storage = {"kind": "sparse", "method": "dare", "drop": drop, "seed": seed}
        header = VectorHeader(
            base_model=vf.base_model,
            base_hash=vf.base_hash,
            dtype=dtype,
            recipe={"op": "compress", "input": vf.sha256, **{k: v for k, v in storage.items() if k != "kind"}, "dtype": str(dtype).removeprefix("torch.")},
            storage=storage,
        )
        err2 = norm2 = 0.0
        max_abs = 0.0
        kept = 0
        sparse_items = []
        writer = None if storage["kind"] == "sparse" else VectorWriter(dest, vf.shapes(), header)
        total = 4 * vf.param_count
        with _progress(total, "compress", progress) as bar:
            if writer:
                writer.__enter__()
            try:
                for name in vf.names:
                    tau = vf.read(name)
                    if density is not None:
                        approx = algebra.magnitude_prune(tau, density)
                    elif drop is not None:
                        approx = algebra.dare(tau, drop, algebra.tensor_seed(seed, 0, name))
                    else:
                        approx = tau
                    check_fits(approx, dtype, f"compressed tensor {name!r}", "keep float32: drop --dtype" if drop is None else "keep float32, or use a smaller --drop")
                    approx = approx.to(dtype).to(torch.float32)
                    if writer:
                        writer.write(name, approx)
                        kept += approx.numel()
                    else:
                        idx = torch.nonzero(approx.reshape(-1)).reshape(-1)
                        sparse_items.append((name, tuple(tau.shape), idx, approx.reshape(-1)[idx]))
                        kept += idx.numel()
                    diff = tau - approx
                    err2 += float(diff.double().pow(2).sum())
                    norm2 += float(tau.double().pow(2).sum())
                    max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
                    bar.update(4 * tau.numel())
            except BaseException as exc:
                if writer:
                    writer.__exit__(type(exc), exc, None)
                raise
            if writer:
                writer.__exit__(None, None, None)
                sha = writer.sha256
            else:
                sha = write_sparse_vector(dest, header, sparse_items, vf.names, vf.param_count)
        return {
            "path": str(out),
            "sha256": sha,
            "storage": storage["kind"],
            "dtype": str(dtype).removeprefix("torch."),
            "kept_fraction": kept / max(vf.param_count, 1),
            "relative_l2_error": math.sqrt(err2 / norm2) if norm2 else 0.0,
            "max_abs_error": max_abs,
            "input_bytes": vf.path.stat().st_size,
            "output_bytes": dest.stat().st_size,
        }
