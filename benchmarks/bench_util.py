"""Helpers shared by the benchmarks: CPU accounting of Python and its TFF workers, report text.

Import after putting the repository root on `sys.path`, as the benchmarks do.
"""

from __future__ import annotations

import os
from typing import Optional

from tff_clipq import runtime


def process_cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of process `pid` (all its threads) so far; 0 if it is gone."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')  # utime, stime
  except (OSError, IndexError, ValueError):
    return 0.0


def cpu_seconds_with_workers() -> float:
  """CPU seconds so far of this process plus the live workers `tff_clipq.runtime` started (Linux).

  TFF runs computations in the worker, so a computation's cost is the change of this sum.
  """
  return process_cpu_seconds(os.getpid()) + sum(
    process_cpu_seconds(pid) for pid in runtime.live_worker_pids()
  )


def describe_intra_op_threads(intra_op_threads: Optional[int]) -> str:
  """How a worker started with `intra_op_threads` (None or 0: TensorFlow's default) threads ops."""
  if intra_op_threads:
    return f'{intra_op_threads} thread(s) per TensorFlow operation'
  return "TensorFlow's default threads per operation (one per core)"
