"""taskvec: task arithmetic (Ilharco et al., ICLR 2023) for any Hugging Face model.

The core library: tensor algebra (:mod:`taskvec.algebra`), streaming
safetensors I/O (:mod:`taskvec.io`), the task-vector format
(:mod:`taskvec.vector`) and the streaming engine (:mod:`taskvec.engine`),
plus data, heads, training, evaluation and λ search. It imports no prefect,
mlflow or dvc; the pipeline lives in ``pipeline/``, ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"
