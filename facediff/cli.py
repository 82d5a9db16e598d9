"""The command-line boundary shared by every entry point (``facediff.pipelines``,
``data_pipelines``, ``launch``): a user's mistake is answered with ONE line on stderr,
``<prog>: error: <message naming the input>``, and exit status 2, never a traceback.

What counts as a user's mistake:

* ``OSError``: a missing, unreadable or misplaced file or folder (FileNotFoundError,
  PermissionError, NotADirectoryError, FileExistsError, ...), including the project's
  FileNotFoundError subclasses (``WeightsError``, ``FaceModelError``, ``LayoutError``).
* ``ValueError`` / ``KeyError`` raised while the inputs are read and checked, before any
  model runs: a file in the wrong format, an unknown key, field or variant, a bad
  number. The configs, converters, loaders and tasks raise these with messages that
  name the file, key or field (``RecordError``, ``StateDictMismatchError``,
  ``ExportError``, ``PhotoError``, ``config.model.<field>=...``).
* After that (training, sampling), only the named input-error classes a CLI lists
  (e.g. ``CheckpointMismatchError``: a workdir trained with another config).

Anything else is a bug and keeps its traceback. CLIs validate their outputs' places
before writing, so such a mistake leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import sys

INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError)


def one_line(error: BaseException | str) -> str:
  """The message of ``error`` on one line (a KeyError's without the quotes ``str``
  adds; newlines and runs of spaces become one space)."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    text = error.args[0]
  else:
    text = str(error)
  return " ".join(text.split()) or type(error).__name__


def fail(prog: str, error: BaseException | str) -> int:
  """Writes ``<prog>: error: <message>`` to stderr; returns the exit status 2."""
  print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
  return 2


def check_output_dir(path: str, flag: str) -> None:
  """Raises NotADirectoryError naming ``flag`` if ``path`` exists and is not a folder
  (before anything is written there)."""
  if path and os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"{flag} {path}: exists and is not a folder")


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors (a missing or malformed argument)
  are one line, ``<prog>: error: <message>``, exit 2 (``--help`` still prints the
  usage)."""

  def error(self, message: str):
    sys.exit(fail(self.prog, message))
