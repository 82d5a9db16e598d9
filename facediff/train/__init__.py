"""facediff's trainer: one sharded, resumable training loop for every model.

A model supplies a ``Task`` (``task.py``): ``init``, ``loss_fn`` and an optional
``sample_fn`` for preview grids; everything else lives here, split by concern:

* ``optim.py``: learning-rate schedule, AdamW with clipping, EMA.
* ``state.py``: the train state pytree, created already sharded on the mesh.
* ``step.py``: the jitted step factory (micro-batch accumulation, non-finite guard).
* ``checkpoint.py``: orbax checkpoints of the state and the data iterator together.
* ``writers.py``: JSONL / TensorBoard metrics, console progress, image grids.
* ``loop.py``: ``train_and_evaluate(config, workdir, task, train_iter)``.

The trainer never imports ``data_pipelines``: ``launch/train.py`` builds the data
iterator and hands it in.
"""

from facediff.train.loop import train_and_evaluate
from facediff.train.task import Task

__all__ = ["Task", "train_and_evaluate"]
