"""The absl entry points' command-line boundary (``facediff.cli`` has the policy): a
flag or config mistake (an unknown flag, a bad value, a missing required flag, a
config file that does not exist, an unknown variant, an override of a field the config
lacks) is answered with one line and exit status 2, not absl's usage block or a
traceback. ``app.run(main, flags_parser=cli.flags_parser(PROG))``."""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Sequence

from absl import flags
from ml_collections import config_flags

from facediff import cli

INPUT_ERRORS = cli.INPUT_ERRORS
fail = cli.fail
check_output_dir = cli.check_output_dir


def run_errors() -> tuple[type[BaseException], ...]:
  """Training-time mistakes that are the user's, not bugs: a workdir trained with
  another config (CheckpointMismatchError), a record that turns out corrupt
  (RecordError), a file that cannot be read or written (OSError)."""
  from data_pipelines.records import RecordError  # noqa: PLC0415
  from facediff.train.checkpoint import CheckpointMismatchError  # noqa: PLC0415

  return (OSError, CheckpointMismatchError, RecordError)


def _config_file_message(message: str) -> str:
  """``flag --config=F:V: Error whilst parsing config file: <traceback> XError: msg``
  -> ``flag --config=F:V: msg`` (config_flags puts the config's own traceback into
  the flag error)."""
  head = message.split(": Error whilst parsing config file", 1)[0]
  lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
  last = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1]) if lines else ""
  return f"{head}: {last}"


def _override_message(argv: Sequence[str], error: BaseException) -> str:
  """Names the ``--<config>.<path>=...`` argument whose field does not exist."""
  text = cli.one_line(error)
  found = re.search(r"'([^']+)'", text)
  key = found.group(1) if found else ""
  overrides = [a for a in argv[1:] if re.match(r"--\w+\.", a)]
  for arg in overrides:
    path = arg[2:].split("=", 1)[0].split(".")
    if key and key in path:
      hint = text.replace(f"'{key}'", "").strip(" ;\"'")
      return f"{arg}: the config has no field {key!r}" + (f" ({hint})" if hint else "")
  return f"config override {' '.join(overrides)}: {text}"


def _check_config_loaded(name: str) -> None:
  """config_flags defers a config file that cannot be read until its first use:
  read it now so that the mistake is answered before anything runs."""
  value = flags.FLAGS[name].value
  if value is None:
    return
  try:
    value.get("__facediff_probe__", None)
  except OSError as e:
    path = config_flags.get_config_filename(flags.FLAGS[name]).split(":", 1)[0]
    if not os.path.isfile(path):
      raise OSError(f"--{name} {path}: no such config file") from e
    raise OSError(f"--{name} {path}: cannot load it ({cli.one_line(e)})") from e


def flags_parser(prog: str, config_names: Sequence[str] = ("config",)) -> Callable:
  """An ``app.run`` flags parser that answers flag and config mistakes with one line
  (``<prog>: error: ...``) and exit 2. ``config_names``: the config-file flags to load
  right away."""

  def parse(argv: Sequence[str]) -> list[str]:
    try:
      args = flags.FLAGS(list(argv))
    except flags.Error as e:
      message = str(e)
      if "Error whilst parsing config file" in message:
        message = _config_file_message(message)
      sys.exit(fail(prog, message))
    except (KeyError, AttributeError) as e:  # an override of a field the config lacks
      sys.exit(fail(prog, _override_message(argv, e)))
    except SyntaxError as e:  # a config file that is not Python
      sys.exit(fail(prog, f"config file {e.filename}: line {e.lineno}: {e.msg}"))
    try:
      for name in config_names:
        if name in flags.FLAGS:
          _check_config_loaded(name)
    except OSError as e:
      sys.exit(fail(prog, e))
    return args

  return parse


def no_extra_arguments(prog: str, argv: Sequence[str]) -> None:
  """Exits with one line if ``argv`` (after the program) is not empty."""
  if len(argv) > 1:
    sys.exit(fail(prog, f"unexpected arguments: {' '.join(argv[1:])}"))
