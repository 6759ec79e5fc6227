"""The benchmark scripts under `benchmarks/`, for their tests: import one, or run it.

The benchmarks are scripts beside the package, not part of it. `load` imports
`benchmarks/<name>.py` as the module `benchmarks.<name>`, after putting the repository root on
`sys.path` as the scripts themselves do, so a script and the modules it imports are loaded once.
`run` runs a script in a fresh Python process, its output going to a log file.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType
from typing import Sequence

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))


def script_path(name: str) -> str:
  """The path of `benchmarks/<name>.py`."""
  return os.path.join(REPO_ROOT, 'benchmarks', f'{name}.py')


def load(name: str) -> ModuleType:
  """The module `benchmarks/<name>.py`, imported as `benchmarks.<name>`."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  return importlib.import_module(f'benchmarks.{name}')


def run(name: str, flags: Sequence[str], log_path: str, timeout: float) -> tuple[int, str]:
  """(exit status, output) of `python benchmarks/<name>.py *flags`.

  The output goes to `log_path`, a file rather than a pipe: a TFF worker the script starts could
  hold a pipe open after the script ends.

  Args:
    name: the script's name, without `.py`.
    flags: its command line flags.
    log_path: where its standard output and error are written.
    timeout: seconds before the run is stopped (raises `subprocess.TimeoutExpired`).
  """
  with open(log_path, 'w') as log:
    result = subprocess.run(
      [sys.executable, script_path(name), *flags],
      stdout=log,
      stderr=subprocess.STDOUT,
      timeout=timeout,
      check=False,
    )
  with open(log_path) as log:
    return result.returncode, log.read()
