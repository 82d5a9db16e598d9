"""Checkpoints: one orbax ``CheckpointManager`` holding the train state and the data
iterator's position together (``ocp.args.Composite``).

* Saves are asynchronous; ``save`` every ``checkpoint_every`` steps, keep the last
  ``keep_checkpoints``, or, with ``keep_best_metric``, the best ``keep_checkpoints`` by
  that eval metric (``keep_best_mode`` "min" / "max"; steps saved without eval metrics
  are not ranked) and always the newest, which a resume starts from.
* Orbax writes a step to a temporary directory (``<step>.orbax-checkpoint-tmp``) and
  renames it when complete, so a process killed mid-save leaves no step that
  ``all_steps`` lists; restoring takes the newest complete step and warns about each
  temporary directory it passes over (left on disk; orbax replaces it if that step is
  saved again). A step whose files turn out unreadable is skipped with a warning
  naming its directory, never deleted.
* Before anything is restored or compiled, the stored parameter shapes are compared
  with the config's; a mismatch raises naming the first differing parameter path.
* Restoring onto another mesh works: arrays are read straight into the target
  shardings of the abstract state.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from facediff.train.state import TrainState

log = logging.getLogger(__name__)

_TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not have the shapes the config builds."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Checkpointer:
  def __init__(self, directory: str, train_cfg):
    self.directory = os.path.abspath(directory)
    best = str(train_cfg.get("keep_best_metric", "") or "")
    mode = str(train_cfg.get("keep_best_mode", "min"))
    if mode not in ("min", "max"):
      raise ValueError(f"config.train.keep_best_mode={mode!r}: 'min' or 'max'")
    keep = int(train_cfg.get("keep_checkpoints", 3))
    policy = ocp.checkpoint_managers.LatestN(n=keep)
    if best:
      policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
          ocp.checkpoint_managers.LatestN(n=1),
          ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda m: float(m[best]),
            reverse=mode == "min",  # sorted worst first; the last n are kept
            n=keep,
            keep_checkpoints_without_metrics=False,
          ),
        ]
      )
    options = ocp.CheckpointManagerOptions(
      best_fn=(lambda m: float(m[best])) if best else None,
      best_mode=mode,
      preservation_policy=policy,
      enable_async_checkpointing=bool(train_cfg.get("async_checkpointing", True)),
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  # ---------------------------------------------------------------- saving

  def save(self, step: int, state: TrainState, data_iter=None, metrics=None, force=False):
    items = {"state": ocp.args.StandardSave(state.as_dict())}
    if data_iter is not None:
      import grain  # noqa: PLC0415  (only when a grain iterator is checkpointed)

      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(
      int(step), args=ocp.args.Composite(**items), metrics=metrics, force=force
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def reached_preemption(self, step: int) -> bool:
    try:
      return bool(self.manager.reached_preemption(int(step)))
    except Exception:  # no preemption service (single process without jax.distributed)
      return False

  # ---------------------------------------------------------------- restoring

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def check_shapes(self, step: int, abstract: TrainState) -> None:
    """Raises ``CheckpointMismatchError`` naming the first parameter whose stored shape
    differs from ``abstract``'s (or that is missing on either side)."""
    where = os.path.join(self.directory, str(step))
    try:
      meta = ocp.StandardCheckpointer().metadata(os.path.join(where, "state"))
    except Exception:  # unreadable metadata: restore_latest reports and skips the step
      return
    stored = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if not isinstance(stored, dict) or "params" not in stored:
      return
    stored_params = dict(jax.tree_util.tree_flatten_with_path(stored["params"])[0])
    want = dict(jax.tree_util.tree_flatten_with_path(abstract.params)[0])
    stored_by_name = {_path_str(k): v for k, v in stored_params.items()}
    want_by_name = {_path_str(k): v for k, v in want.items()}
    for name in sorted(set(stored_by_name) | set(want_by_name)):
      if name not in stored_by_name:
        raise CheckpointMismatchError(
          f"{where}: checkpoint has no parameter params/{name} that the config builds"
        )
      if name not in want_by_name:
        raise CheckpointMismatchError(
          f"{where}: checkpoint parameter params/{name} is not built by the config"
        )
      got, exp = tuple(stored_by_name[name].shape), tuple(want_by_name[name].shape)
      if got != exp:
        raise CheckpointMismatchError(
          f"{where}: parameter params/{name} has shape {got} in the checkpoint, the "
          f"config builds {exp}"
        )

  def incomplete(self) -> list[str]:
    """Temporary step directories: saves that never finished (a killed process)."""
    if not os.path.isdir(self.directory):
      return []
    names = os.listdir(self.directory)
    return sorted(os.path.join(self.directory, n) for n in names if _TMP_SUFFIX in n)

  def restore_latest(self, abstract: TrainState, data_iter=None) -> tuple[TrainState, int] | None:
    """The newest readable complete step restored into ``abstract``'s shardings (and
    ``data_iter`` restored in place), or None if there is none."""
    for path in self.incomplete():
      log.warning("checkpoint %s is incomplete (its save never finished), skipped", path)
    for step in reversed(self.steps()):
      self.check_shapes(step, abstract)
      items = {"state": ocp.args.StandardRestore(abstract.as_dict())}
      if data_iter is not None:
        import grain  # noqa: PLC0415

        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # unreadable files: skip this step, keep it on disk
        log.warning(
          "checkpoint %s is unreadable, skipped (%s: %s)",
          os.path.join(self.directory, str(step)),
          type(e).__name__,
          e,
        )
        continue
      return TrainState.from_dict(dict(out["state"])), step
    return None
