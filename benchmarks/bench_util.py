"""Shared by the benchmarks: CPU and memory accounting of Python and its TFF workers.

The benchmarks compare their variants by the resources of this process and of the
`worker_binary` processes `tff_clipq.runtime` starts, read from Linux's `/proc`; the report text
for the workers' thread setting lives here too. Import after putting the repository root on
`sys.path`, as the benchmarks do.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from tff_clipq import runtime

MB = 1024.0 * 1024.0


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


def _read_status_kb(pid: int, key: str) -> Optional[int]:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith(key + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes(pid: int) -> Optional[int]:
  """The resident set size of process `pid` in bytes, or None if it cannot be read."""
  kb = _read_status_kb(pid, 'VmRSS')
  return None if kb is None else kb * 1024


class PeakMemory:
  """Peak RSS of a set of processes over an interval: `VmHWM` after a reset, else sampling.

  A context manager: `peaks` and `rises` (peak minus the RSS at entry) are read after the `with`
  block. `pids` maps names to process ids; None ids are left out.
  """

  def __init__(self, pids: dict[str, Optional[int]]):
    self._pids = {name: pid for name, pid in pids.items() if pid is not None}
    self._resettable = all(self._reset(pid) for pid in self._pids.values())
    self._peaks: dict[str, int] = {}
    self._starts: dict[str, int] = {}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  @staticmethod
  def _reset(pid: int) -> bool:
    try:
      with open(f'/proc/{pid}/clear_refs', 'w') as f:
        f.write('5')  # Resets VmHWM to the current RSS (Linux >= 4.0).
      return True
    except OSError:
      return False

  @property
  def method(self) -> str:
    return 'VmHWM (reset per round)' if self._resettable else 'RSS sampled every 20 ms'

  def __enter__(self) -> PeakMemory:
    self._peaks = {name: rss_bytes(pid) or 0 for name, pid in self._pids.items()}
    self._starts = dict(self._peaks)
    if self._resettable:
      for pid in self._pids.values():
        self._reset(pid)
    else:
      self._stop.clear()
      self._thread = threading.Thread(target=self._sample, daemon=True)
      self._thread.start()
    return self

  def _sample(self) -> None:
    while not self._stop.wait(0.02):
      for name, pid in self._pids.items():
        self._peaks[name] = max(self._peaks[name], rss_bytes(pid) or 0)

  def __exit__(self, *exc_info) -> None:
    if self._resettable:
      for name, pid in self._pids.items():
        kb = _read_status_kb(pid, 'VmHWM')
        self._peaks[name] = max(self._peaks[name], (kb or 0) * 1024)
    else:
      self._stop.set()
      self._thread.join()

  @property
  def peaks(self) -> dict[str, int]:
    return dict(self._peaks)

  @property
  def rises(self) -> dict[str, int]:
    return {name: max(peak - self._starts[name], 0) for name, peak in self._peaks.items()}
