"""`worker_binary` processes that `tff_clipq.runtime` starts, owns and stops by PID.

No worker started here outlives Python or holds its stdout/stderr open:

* the worker writes to an anonymous temporary file (read back for error messages), never to the
  parent's stdout/stderr;
* on Linux the kernel sends it SIGTERM when Python dies, even by SIGKILL (`PR_SET_PDEATHSIG`);
* an `atexit` handler, `WorkerProcess.stop()` and the contexts that own workers stop it by PID
  (SIGINT, then SIGKILL after a timeout).
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence
import concurrent.futures
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Optional

from absl import logging
import grpc
import portpicker
import tensorflow_federated as tff

from tff_clipq.runtime import checks
from tff_clipq.runtime import grpc_stub

WORKER_BINARY_PATH = os.path.join(os.path.dirname(tff.__file__), 'data', 'worker_binary')
_STOP_TIMEOUT_S = 5.0
_START_ATTEMPTS = 3  # A port picked by portpicker can be taken before the worker binds it.
_LOG_TAIL_BYTES = 2000


class WorkerStartError(RuntimeError):
  """A `worker_binary` process exited, or did not serve, during start-up."""


# Runs as `python -I -S -c _LAUNCHER PARENT_PID BINARY ARGS...` and replaces itself with the
# binary (same PID). `PR_SET_PDEATHSIG` survives `exec`: the kernel sends the worker SIGTERM when
# the thread that started the launcher ends. Signal dispositions survive `exec` too, and Python
# ignores SIGPIPE/SIGXFSZ (and keeps an inherited ignored SIGINT), so they are reset first.
# A launcher process rather than `preexec_fn`: Python code between fork and exec in a process with
# TensorFlow's and gRPC's threads can deadlock.
_LAUNCHER = """
import ctypes, os, signal, sys
for name in ('SIGINT', 'SIGTERM', 'SIGPIPE', 'SIGXFSZ'):
  signal.signal(getattr(signal, name), signal.SIG_DFL)
if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:
  sys.exit('prctl(PR_SET_PDEATHSIG) failed: errno %d' % ctypes.get_errno())
if os.getppid() != int(sys.argv[1]):
  sys.exit('parent exited before the TFF worker started')
os.execv(sys.argv[2], sys.argv[2:])
"""


def _launch_command(args: list[str]) -> list[str]:
  """`args`, run through `_LAUNCHER` where it can work (Linux, a known Python executable)."""
  if sys.platform.startswith('linux') and sys.executable:
    return [sys.executable, '-I', '-S', '-c', _LAUNCHER, str(os.getpid()), *args]
  logging.warning(
    'Cannot tie TFF workers to this process on %s; only `atexit` stops them.', sys.platform
  )
  return args


class _SpawnerThread:
  """A daemon thread that runs every `subprocess.Popen` of this module.

  `PR_SET_PDEATHSIG` fires when the thread that started the child ends, not the process. Workers
  may be started lazily from TFF's event-loop threads, which end when a context is collected; a
  daemon thread that never returns only ends with the process.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._requests: queue.SimpleQueue = queue.SimpleQueue()
    self._thread: Optional[threading.Thread] = None

  def after_fork_in_child(self) -> None:
    """A forked child has only the forking thread: start afresh there."""
    self.__init__()

  def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
    with self._lock:
      if self._thread is None:
        self._thread = threading.Thread(
          target=self._serve, name='tff_clipq-worker-spawner', daemon=True
        )
        self._thread.start()
      requests = self._requests
    future: concurrent.futures.Future = concurrent.futures.Future()
    requests.put((future, args, kwargs))
    return future.result()

  def _serve(self) -> None:
    while True:
      future, args, kwargs = self._requests.get()
      if not future.set_running_or_notify_cancel():
        continue
      try:
        future.set_result(subprocess.Popen(args, **kwargs))
      except BaseException as e:  # pylint: disable=broad-except
        future.set_exception(e)


_SPAWNER = _SpawnerThread()
_registry_lock = threading.Lock()
_started_workers: dict[int, WorkerProcess] = {}


class WorkerProcess:
  """A `worker_binary --port=P` child process that this module started and owns.

  Create with `start_local_workers` (or a local context, which starts one on first use). The
  worker serves TFF's executor service on `address` (the binary listens on all interfaces). Use
  as a context manager, or call `stop()`; at interpreter exit every worker still running is
  stopped, and if Python dies without running `atexit` handlers the kernel terminates it (Linux).

  Args:
    process: The started `worker_binary` process.
    port: The port it serves on.
    log_file: The open file that receives its stdout and stderr; closed when it is stopped.
  """

  def __init__(self, process: subprocess.Popen, port: int, log_file: IO[bytes]):
    self._process = process
    self._port = port
    self._log_file = log_file
    self._owner_pid = os.getpid()

  @property
  def pid(self) -> int:
    return self._process.pid

  @property
  def port(self) -> int:
    return self._port

  @property
  def address(self) -> str:
    """`host:port` to give to `set_remote_execution_context`."""
    return f'localhost:{self._port}'

  def is_running(self) -> bool:
    if os.getpid() != self._owner_pid:  # A forked child does not own its parent's workers.
      return False
    return self._process.poll() is None

  @property
  def returncode(self) -> Optional[int]:
    """The exit status (negative: killed by that signal), or None while running."""
    return self._process.poll()

  def log_tail(self, num_bytes: int = _LOG_TAIL_BYTES) -> str:
    """The last `num_bytes` of what the worker wrote to stdout/stderr."""
    try:
      fd = self._log_file.fileno()
      size = os.fstat(fd).st_size
      return os.pread(fd, num_bytes, max(0, size - num_bytes)).decode(errors='replace')
    except (OSError, ValueError):
      return ''

  def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """Sends SIGINT, waits up to `timeout_s`, then SIGKILLs. Safe to call more than once."""
    stop_workers([self], timeout_s)

  def __enter__(self) -> WorkerProcess:
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def __repr__(self) -> str:
    state = 'running' if self.is_running() else f'exited ({self.returncode})'
    return f'WorkerProcess(pid={self.pid}, address={self.address!r}, {state})'

  def _signal(self, signum: int) -> None:
    # Popen.send_signal does nothing once the process has been reaped, so a reused PID is safe.
    if self.is_running():
      try:
        self._process.send_signal(signum)
      except ProcessLookupError:
        pass

  def _wait(self, timeout_s: float) -> bool:
    try:
      self._process.wait(max(0.0, timeout_s))
      return True
    except subprocess.TimeoutExpired:
      return False

  def _release(self) -> None:
    with _registry_lock:
      if _started_workers.get(self.pid) is self:
        del _started_workers[self.pid]
    try:
      self._log_file.close()
    except OSError:
      pass


def stop_workers(workers: Sequence[WorkerProcess], timeout_s: float = _STOP_TIMEOUT_S) -> None:
  """Stops `workers` together: SIGINT to all, a shared wait of `timeout_s`, SIGKILL to the rest.

  Args:
    workers: The workers to stop; those a forked child does not own are skipped.
    timeout_s: Seconds to wait for all of them to exit after SIGINT (and again after SIGKILL).
  """
  owned = [w for w in workers if os.getpid() == w._owner_pid]  # pylint: disable=protected-access
  for worker in owned:
    worker._signal(signal.SIGINT)  # pylint: disable=protected-access
  deadline = time.monotonic() + timeout_s
  for worker in owned:
    if not worker._wait(deadline - time.monotonic()):  # pylint: disable=protected-access
      logging.warning(
        'TFF worker pid %d ignored SIGINT for %.1f s; killing it.', worker.pid, timeout_s
      )
      worker._signal(signal.SIGKILL)  # pylint: disable=protected-access
      worker._wait(timeout_s)  # pylint: disable=protected-access
    worker._release()  # pylint: disable=protected-access


def live_worker_pids() -> list[int]:
  """PIDs of the worker processes this module started that are still running."""
  with _registry_lock:
    workers = list(_started_workers.values())
  return sorted(w.pid for w in workers if w.is_running())


@atexit.register
def _stop_all_workers() -> None:
  with _registry_lock:
    workers = list(_started_workers.values())
  stop_workers(workers)


def _after_fork_in_child() -> None:
  """A forked child (e.g. `multiprocessing`) owns none of its parent's workers.

  The lock is replaced too: another thread of the parent may have held it at the fork.
  """
  global _registry_lock, _started_workers
  _registry_lock, _started_workers = threading.Lock(), {}
  _SPAWNER.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _wait_until_serving(worker: WorkerProcess, deadline: float, poll_s: float = 0.25) -> None:
  """Blocks until `worker` serves; raises WorkerStartError if it exits or the deadline passes."""
  # Retry the connection often: the worker binds its port a fraction of a second after exec.
  options = (('grpc.initial_reconnect_backoff_ms', 100), ('grpc.max_reconnect_backoff_ms', 500))
  with grpc.insecure_channel(worker.address, options=options) as channel:
    while True:
      if not worker.is_running():
        raise WorkerStartError(
          f'{WORKER_BINARY_PATH} --port={worker.port} exited with status {worker.returncode} '
          f'during start-up. Its last output:\n{worker.log_tail()}'
        )
      if grpc_stub.probe(channel, min(poll_s, max(0.01, deadline - time.monotonic()))).result() != (
        grpc_stub.Probe.UNREACHABLE
      ):
        return
      if time.monotonic() >= deadline:
        raise WorkerStartError(
          f'{WORKER_BINARY_PATH} --port={worker.port} (pid {worker.pid}) did not serve '
          f'within the start-up timeout. Its last output:\n{worker.log_tail()}'
        )


def _worker_environment(intra_op_threads: Optional[int]) -> Optional[dict[str, str]]:
  """The worker's environment: this process's, with TensorFlow's intra-op pool size if given."""
  if intra_op_threads is None:
    return None  # Inherit.
  environment = dict(os.environ)
  # Read by TensorFlow when a config leaves the intra-op pool size at 0, as TFF's worker does.
  environment['TF_NUM_INTRAOP_THREADS'] = str(intra_op_threads)
  return environment


def _spawn_worker(
  max_concurrent_computation_calls: int, intra_op_threads: Optional[int]
) -> WorkerProcess:
  """Starts one worker on a free port and registers it; does not wait for it to serve."""
  if not os.path.isfile(WORKER_BINARY_PATH):
    raise RuntimeError(f'Expected a TFF worker binary at {WORKER_BINARY_PATH}.')
  port = portpicker.pick_unused_port()
  # An anonymous (already unlinked) file: nothing to clean up, yet `log_tail()` can read it back.
  # The worker writes a few lines at start and on errors only.
  log_file = tempfile.TemporaryFile()
  try:
    process = _SPAWNER.popen(
      _launch_command(
        [
          WORKER_BINARY_PATH,
          f'--port={port}',
          f'--max_concurrent_computation_calls={max_concurrent_computation_calls}',
        ]
      ),
      stdin=subprocess.DEVNULL,
      stdout=log_file,
      stderr=subprocess.STDOUT,
      env=_worker_environment(intra_op_threads),
      close_fds=True,
      # Its own process group (setsid): a terminal's Ctrl-C goes to Python, which stops the worker.
      start_new_session=True,
    )
  except BaseException:
    log_file.close()
    raise
  worker = WorkerProcess(process, port, log_file)
  with _registry_lock:
    _started_workers[worker.pid] = worker
  logging.info('Started TFF worker pid %d on port %d.', worker.pid, port)
  return worker


def start_serving_workers(
  num_workers: int,
  max_concurrent_computation_calls: int,
  startup_timeout_s: float,
  intra_op_threads: Optional[int] = None,
) -> list[WorkerProcess]:
  """Starts `num_workers` workers together and returns once all serve.

  A worker that exits during start-up (typically: its port was taken between `portpicker` and the
  bind) is replaced, up to `_START_ATTEMPTS` times. On any failure every worker started is stopped.
  Unlike `start_local_workers`, the arguments are not validated.

  Args:
    num_workers: How many workers to start.
    max_concurrent_computation_calls: Passed to each worker; nonpositive means no limit.
    startup_timeout_s: How long each attempt waits for its workers to serve.
    intra_op_threads: Threads each TensorFlow operation of a worker may use; None: TensorFlow's
      default.

  Raises:
    WorkerStartError: If a worker does not serve in time, or still exits at the last attempt.
  """
  serving: list[WorkerProcess] = []
  spawned: list[WorkerProcess] = []
  try:
    for attempt in range(1, _START_ATTEMPTS + 1):
      spawned = [
        _spawn_worker(max_concurrent_computation_calls, intra_op_threads)
        for _ in range(num_workers - len(serving))
      ]
      deadline = time.monotonic() + startup_timeout_s
      exited: list[WorkerStartError] = []
      for worker in spawned:
        try:
          _wait_until_serving(worker, deadline)
          serving.append(worker)
        except WorkerStartError as e:
          if worker.is_running() or attempt == _START_ATTEMPTS:
            raise  # Timed out, or out of attempts.
          worker.stop()
          exited.append(e)
      if not exited:
        return serving
      logging.warning(
        '%d TFF worker(s) exited at start-up; retrying. First error: %s', len(exited), exited[0]
      )
    raise AssertionError('unreachable')
  except BaseException:
    stop_workers(spawned + [w for w in serving if w not in spawned])
    raise


def start_local_workers(
  num_workers: int,
  *,
  max_concurrent_computation_calls: int = -1,
  startup_timeout_s: float = 60.0,
  intra_op_threads: Optional[int] = None,
) -> list[WorkerProcess]:
  """Starts `num_workers` `worker_binary` processes on free local ports; returns once all serve.

  The processes are owned by this module (see `WorkerProcess`); pass `[w.address for w in
  workers]` to `set_remote_execution_context`, and `stop()` them when done (or let the interpreter
  exit). If any worker fails to start, all of them are stopped and the error is raised.

  Args:
    num_workers: How many workers to start, >= 1.
    max_concurrent_computation_calls: Passed to each worker; nonpositive means no limit.
    startup_timeout_s: How long to wait for each worker to serve.
    intra_op_threads: Threads each TensorFlow operation of a worker may use
      (see the `tff_clipq.runtime` docstring); None: TensorFlow's default, one per core.

  Raises:
    ValueError: If an argument is invalid.
    WorkerStartError: If a worker exits or does not serve within `startup_timeout_s`.
  """
  checks.check_int(num_workers, 'num_workers', minimum=1)
  checks.check_int(max_concurrent_computation_calls, 'max_concurrent_computation_calls')
  checks.check_positive(startup_timeout_s, 'startup_timeout_s')
  checks.check_intra_op_threads(intra_op_threads)
  return start_serving_workers(
    num_workers, max_concurrent_computation_calls, startup_timeout_s, intra_op_threads
  )
