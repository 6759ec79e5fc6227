"""TFF execution contexts whose `worker_binary` processes never outlive Python.

TFF's default context starts `tensorflow_federated/data/worker_binary` with the parent's stdout and
stderr and stops it only from a `__del__`, which need not run at exit: the child can outlive Python
and keep a pipe open (`python run.py | tail` hangs). Here this module starts and owns every worker:

* the worker writes to an anonymous temporary file (read back for error messages), never to the
  parent's stdout/stderr, so it cannot hold a pipe open;
* on Linux the kernel sends it SIGTERM when Python dies, even by SIGKILL (`PR_SET_PDEATHSIG`);
* an `atexit` handler, replacing or resetting a context, and `execution_context()` stop it by PID
  (SIGINT, then SIGKILL after a timeout).

Two kinds of context are offered, both compiled exactly as TFF's own native contexts:

* local: one worker process, like `tff.backends.native.set_sync_local_cpp_execution_context`;
* remote: `worker_binary` processes at `host:port` addresses (on other machines, or started here
  with `start_local_workers`), one `tff.framework.AsyncExecutionContext` per worker, combined by a
  `tff.framework.MergeableCompExecutionContext` that splits the clients across the workers. Such a
  context runs computations with one aggregation stage (parallel aggregations are fine, an
  aggregation that depends on another one is not: the compiler raises).

TFF retries a remote call that failed with UNAVAILABLE forever; here a worker that stays unreachable
makes the call raise `WorkerUnavailableError`, naming the worker, after `reconnect_timeout_s`.

Workers started here take `intra_op_threads`: how many threads one TensorFlow operation may use
(the worker's `TF_NUM_INTRAOP_THREADS`; None keeps TensorFlow's default, one per core). A worker
runs the clients of a round concurrently, so with many clients per round they keep the cores busy
by themselves and splitting each operation too only adds synchronization. On 2 cores
(`benchmarks/round_time.py`) 1 made 100-client FedAvg rounds 10-14% faster in wall time and
17-18% cheaper in CPU, but 10-client rounds 20% slower.
"""

from __future__ import annotations

import atexit
import collections
from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import contextlib
import dataclasses
import enum
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
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.proto.v0 import executor_pb2_grpc
from tensorflow_federated.python.core.impl.executors import executors_errors

WORKER_BINARY_PATH = os.path.join(os.path.dirname(tff.__file__), 'data', 'worker_binary')

# Same message-size options as TFF's own local context (executor_stacks/executor_factory.py).
_GRPC_MAX_MESSAGE_LENGTH_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_CHANNEL_OPTIONS = (
    ('grpc.max_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ('grpc.max_receive_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ('grpc.max_send_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    # gRPC backs off up to 120 s between reconnection attempts by default; a restarted worker
    # should be seen within seconds.
    ('grpc.max_reconnect_backoff_ms', 2000),
)
_STOP_TIMEOUT_S = 5.0
_START_ATTEMPTS = 3  # A port picked by portpicker can be taken before the worker binds it.
_LOG_TAIL_BYTES = 2000
# A worker that answers with a retryable gRPC error while reachable is retried (by TFF's
# AsyncExecutionContext) at most this many times in a row before the call fails.
_MAX_CONSECUTIVE_RETRIES = 3


class WorkerStartError(RuntimeError):
  """A `worker_binary` process exited, or did not serve, during start-up."""


class WorkerUnavailableError(RuntimeError):
  """A TFF worker could not be reached (dead, stopped, hung or wrong address).

  Attributes:
    address: The `host:port` of the worker.
  """

  def __init__(self, address: str, message: str):
    super().__init__(message)
    self.address = address


# ---------------------------------------------------------------------------------------------
# Worker processes.


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
  logging.warning('Cannot tie TFF workers to this process on %s; only `atexit` stops them.',
                  sys.platform)
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
    _stop_workers([self], timeout_s)

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


def _stop_workers(workers: Sequence[WorkerProcess], timeout_s: float = _STOP_TIMEOUT_S) -> None:
  """Stops `workers` together: SIGINT to all, a shared wait of `timeout_s`, SIGKILL to the rest."""
  owned = [w for w in workers if os.getpid() == w._owner_pid]  # pylint: disable=protected-access
  for worker in owned:
    worker._signal(signal.SIGINT)  # pylint: disable=protected-access
  deadline = time.monotonic() + timeout_s
  for worker in owned:
    if not worker._wait(deadline - time.monotonic()):  # pylint: disable=protected-access
      logging.warning('TFF worker pid %d ignored SIGINT for %.1f s; killing it.', worker.pid,
                      timeout_s)
      worker._signal(signal.SIGKILL)  # pylint: disable=protected-access
      worker._wait(timeout_s)  # pylint: disable=protected-access
    worker._release()  # pylint: disable=protected-access


def live_worker_pids() -> list[int]:
  """PIDs of the worker processes this module started that are still running."""
  with _registry_lock:
    workers = list(_started_workers.values())
  return sorted(w.pid for w in workers if w.is_running())


def process_cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of process `pid` (all its threads) so far; 0 if it is gone."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')  # utime, stime
  except (OSError, IndexError, ValueError):
    return 0.0


def cpu_seconds_with_workers() -> float:
  """CPU seconds so far of this process plus the live workers this module started (Linux).

  TFF runs computations in the worker, so a computation's cost is the change of this sum.
  """
  return process_cpu_seconds(os.getpid()) + sum(
      process_cpu_seconds(pid) for pid in live_worker_pids()
  )


@atexit.register
def _stop_all_workers() -> None:
  with _registry_lock:
    workers = list(_started_workers.values())
  _stop_workers(workers)


def _after_fork_in_child() -> None:
  """A forked child (e.g. `multiprocessing`) owns none of its parent's workers or contexts.

  The locks are replaced too: another thread of the parent may have held them at the fork.
  """
  global _registry_lock, _started_workers, _default_lock, _default_resources
  _registry_lock, _started_workers = threading.Lock(), {}
  _default_lock, _default_resources = threading.Lock(), None
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
      if _probe(channel, min(poll_s, max(0.01, deadline - time.monotonic()))).result() != (
          _Probe.UNREACHABLE
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
  # Read by TensorFlow when a session's config leaves the pool size at 0, as TFF's does.
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
        _launch_command([
            WORKER_BINARY_PATH,
            f'--port={port}',
            f'--max_concurrent_computation_calls={max_concurrent_computation_calls}',
        ]),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=_worker_environment(intra_op_threads),
        close_fds=True,
        # Its own session: a terminal's Ctrl-C goes to Python, which then stops the worker.
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


def _start_serving_workers(
    num_workers: int,
    max_concurrent_computation_calls: int,
    startup_timeout_s: float,
    intra_op_threads: Optional[int] = None,
) -> list[WorkerProcess]:
  """Starts `num_workers` workers together and returns once all serve.

  A worker that exits during start-up (typically: its port was taken between `portpicker` and the
  bind) is replaced, up to `_START_ATTEMPTS` times. On any failure every worker started is stopped.
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
      logging.warning('%d TFF worker(s) exited at start-up; retrying. First error: %s',
                      len(exited), exited[0])
    raise AssertionError('unreachable')
  except BaseException:
    _stop_workers(spawned + [w for w in serving if w not in spawned])
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
      (see the module docstring); None: TensorFlow's default, one per core.

  Raises:
    ValueError: If an argument is invalid.
    WorkerStartError: If a worker exits or does not serve within `startup_timeout_s`.
  """
  _check_int(num_workers, 'num_workers', minimum=1)
  _check_int(max_concurrent_computation_calls, 'max_concurrent_computation_calls')
  _check_positive(startup_timeout_s, 'startup_timeout_s')
  _check_intra_op_threads(intra_op_threads)
  return _start_serving_workers(
      num_workers, max_concurrent_computation_calls, startup_timeout_s, intra_op_threads
  )


# ---------------------------------------------------------------------------------------------
# Argument checks.


def _check_int(value: object, name: str, minimum: Optional[int] = None) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or (
      minimum is not None and value < minimum
  ):
    bound = f' >= {minimum}' if minimum is not None else ''
    raise ValueError(f'`{name}` should be an integer{bound}. Found {value!r}.')


def describe_intra_op_threads(intra_op_threads: Optional[int]) -> str:
  """How a worker started with `intra_op_threads` (None or 0: TensorFlow's default) threads ops."""
  if intra_op_threads:
    return f'{intra_op_threads} thread(s) per TensorFlow operation'
  return "TensorFlow's default threads per operation (one per core)"


def _check_intra_op_threads(value: object) -> None:
  if value is not None:
    _check_int(value, 'intra_op_threads', minimum=1)


def _check_positive(value: object, name: str, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f'`{name}` should be a positive number. Found {value!r}.')


def _check_address(address: object, index: int) -> str:
  """Returns `address` if it is `host:port` (IPv6 hosts in brackets), else raises ValueError."""
  error = ValueError(
      f'`worker_addresses[{index}]` should be "host:port" with an integer port in 1..65535. '
      f'Found {address!r}.'
  )
  if not isinstance(address, str) or any(c.isspace() for c in address):
    raise error
  host, separator, port = address.rpartition(':')
  if not separator or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise error
  if host.startswith('['):
    if not host.endswith(']') or len(host) == 2:
      raise error
  elif ':' in host or ']' in host:  # IPv6 without brackets, or stray bracket.
    raise error
  return address


def _check_addresses(worker_addresses: object) -> list[str]:
  if isinstance(worker_addresses, (str, bytes)) or not isinstance(worker_addresses, Sequence):
    raise ValueError(
        '`worker_addresses` should be a sequence of "host:port" strings. '
        f'Found {worker_addresses!r}.'
    )
  if not worker_addresses:
    raise ValueError('`worker_addresses` should name at least one worker. Found [].')
  return [_check_address(a, i) for i, a in enumerate(worker_addresses)]


# ---------------------------------------------------------------------------------------------
# gRPC pieces.


class _Probe(enum.Enum):
  TFF_WORKER = 'a TFF worker answered'
  NOT_A_TFF_WORKER = 'a gRPC server without TFF\'s executor service answered'
  UNREACHABLE = 'nothing answered'


# What a probe fails with when no server answered it.
_NO_ANSWER_CODES = frozenset({
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
})


def _probe(channel: grpc.Channel, timeout_s: float) -> concurrent.futures.Future:
  """Starts a DisposeExecutor RPC for no executor, which a TFF worker answers with OK.

  `wait_for_ready` makes the RPC wait (up to `timeout_s`) for a connection instead of failing at
  once. A probe RPC rather than `grpc.channel_ready_future`: that one subscribes to connectivity
  changes, whose gRPC polling thread raises if the channel is closed while it polls.

  Returns:
    A future of a `_Probe`.
  """
  outcome: concurrent.futures.Future = concurrent.futures.Future()
  call = executor_pb2_grpc.ExecutorGroupStub(channel).DisposeExecutor.future(
      executor_pb2.DisposeExecutorRequest(), timeout=timeout_s, wait_for_ready=True
  )

  def classify(done_call: grpc.Future) -> None:
    error = done_call.exception()
    code = error.code() if isinstance(error, grpc.Call) else None
    if error is not None and (code is None or code in _NO_ANSWER_CODES):
      outcome.set_result(_Probe.UNREACHABLE)
    elif code == grpc.StatusCode.UNIMPLEMENTED:
      outcome.set_result(_Probe.NOT_A_TFF_WORKER)
    else:
      outcome.set_result(_Probe.TFF_WORKER)  # OK, or the worker's own error.

  call.add_done_callback(classify)
  return outcome


class _UnsubscribedChannel(grpc.Channel):
  """Delegates to `channel`, except that `subscribe` does nothing.

  `tff.framework.RemoteExecutorGrpcStub` subscribes to connectivity changes only to serve its
  `is_ready`, which these contexts never read; the subscription's gRPC polling thread raises
  'Channel closed!' when the channel is closed while it polls.
  """

  def __init__(self, channel: grpc.Channel):
    self._channel = channel

  def subscribe(self, callback, try_to_connect=False):
    del callback, try_to_connect

  def unsubscribe(self, callback):
    del callback

  def unary_unary(self, *args, **kwargs):
    return self._channel.unary_unary(*args, **kwargs)

  def unary_stream(self, *args, **kwargs):
    return self._channel.unary_stream(*args, **kwargs)

  def stream_unary(self, *args, **kwargs):
    return self._channel.stream_unary(*args, **kwargs)

  def stream_stream(self, *args, **kwargs):
    return self._channel.stream_stream(*args, **kwargs)

  def close(self):
    self._channel.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
    return False


class _ClientCallDetails(
    collections.namedtuple(
        '_ClientCallDetails',
        ('method', 'timeout', 'metadata', 'credentials', 'wait_for_ready', 'compression'),
    ),
    grpc.ClientCallDetails,
):
  pass


class _DeadlineInterceptor(grpc.UnaryUnaryClientInterceptor):
  """Gives every RPC without a deadline one of `timeout_s` seconds (TFF sets none)."""

  def __init__(self, timeout_s: float):
    self._timeout_s = timeout_s

  def intercept_unary_unary(self, continuation, client_call_details, request):
    if client_call_details.timeout is None:
      client_call_details = _ClientCallDetails(
          client_call_details.method,
          self._timeout_s,
          client_call_details.metadata,
          client_call_details.credentials,
          client_call_details.wait_for_ready,
          client_call_details.compression,
      )
    return continuation(client_call_details, request)


class _BoundedRetryStub(tff.framework.RemoteExecutorStub):
  """`tff.framework.RemoteExecutorGrpcStub` for one worker, whose failures end in bounded time.

  TFF's `AsyncExecutionContext` retries a call that failed with UNAVAILABLE or FAILED_PRECONDITION
  forever (30 s apart), so a dead worker hangs the computation. Here such an error is passed on to
  TFF's retry only if the worker is reachable again within `reconnect_timeout_s` (e.g. restarted),
  at most `_MAX_CONSECUTIVE_RETRIES` times in a row; otherwise the call raises
  `WorkerUnavailableError`, as does a call that ran past an RPC deadline.
  """

  def __init__(
      self,
      address: str,
      channel: grpc.Channel,
      reconnect_timeout_s: float,
      rpc_timeout_s: Optional[float],
  ):
    self._address = address
    self._channel = channel
    self._reconnect_timeout_s = reconnect_timeout_s
    rpc_channel = channel
    if rpc_timeout_s is not None:
      rpc_channel = grpc.intercept_channel(channel, _DeadlineInterceptor(rpc_timeout_s))
    self._stub = tff.framework.RemoteExecutorGrpcStub(_UnsubscribedChannel(rpc_channel))
    self._consecutive_retries = 0

  def _reachable_within(self, timeout_s: float) -> bool:
    return _probe(self._channel, timeout_s).result() is _Probe.TFF_WORKER

  def _call(self, rpc: Callable[[object], object], request: object):
    try:
      response = rpc(request)
    except executors_errors.RetryableGRPCError as e:
      self._consecutive_retries += 1
      reachable = self._reachable_within(self._reconnect_timeout_s)
      if reachable and self._consecutive_retries <= _MAX_CONSECUTIVE_RETRIES:
        raise  # TFF's AsyncExecutionContext re-runs the invocation on this worker.
      self._consecutive_retries = 0
      failure = f'TFF worker at {self._address} failed ({e.code().name}: {e.details()})'
      if reachable:
        message = f'{failure} {_MAX_CONSECUTIVE_RETRIES + 1} times in a row.'
      else:
        message = (
            f'{failure} and was not reachable again within {self._reconnect_timeout_s:g} s. '
            'Its process may have died; restart it and set the execution context again.'
        )
      raise WorkerUnavailableError(self._address, message) from e
    except grpc.RpcError as e:
      if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise WorkerUnavailableError(
            self._address,
            f'TFF worker at {self._address} did not answer within the RPC deadline '
            f'(`rpc_timeout_s`): {e.details()}. It may be hung or overloaded.',
        ) from e
      raise
    self._consecutive_retries = 0
    return response

  def get_executor(self, request: executor_pb2.GetExecutorRequest):
    return self._call(self._stub.get_executor, request)

  def create_value(self, request: executor_pb2.CreateValueRequest):
    return self._call(self._stub.create_value, request)

  def create_struct(self, request: executor_pb2.CreateStructRequest):
    return self._call(self._stub.create_struct, request)

  def create_call(self, request: executor_pb2.CreateCallRequest):
    return self._call(self._stub.create_call, request)

  def create_selection(self, request: executor_pb2.CreateSelectionRequest):
    return self._call(self._stub.create_selection, request)

  def compute(self, request: executor_pb2.ComputeRequest):
    return self._call(self._stub.compute, request)

  def dispose(self, request: executor_pb2.DisposeRequest):
    # Runs from garbage-collection finalizers: a worker that is gone has nothing left to free.
    try:
      return self._stub.dispose(request)
    except (grpc.RpcError, executors_errors.RetryableError) as e:
      logging.debug('Ignoring failed Dispose on %s: %s', self._address, e)
      return executor_pb2.DisposeResponse()

  def dispose_executor(self, request: executor_pb2.DisposeExecutorRequest):
    # TFF's RemoteExecutor catches gRPC errors here (nothing to clear on a broken connection).
    return self._stub.dispose_executor(request)

  @property
  def is_ready(self) -> bool:
    """Whether the worker answers within a second (TFF's own contexts do not read this)."""
    return self._reachable_within(1.0)


def _executor_factory(
    get_stub: Callable[[], tff.framework.RemoteExecutorStub], default_num_clients: int
) -> tff.framework.ResourceManagingExecutorFactory:
  """One `RemoteExecutor` per cardinality, as TFF's `local_cpp_executor_factory` builds them."""

  def stack_fn(cardinalities):
    if cardinalities.get(tff.CLIENTS) is None:
      cardinalities[tff.CLIENTS] = default_num_clients
    executor = tff.framework.RemoteExecutor(get_stub())
    executor.set_cardinalities(cardinalities)
    return executor

  return tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


# ---------------------------------------------------------------------------------------------
# Contexts.


class _LocalWorkerService:
  """The worker behind a local context: started on first use, stopped by `close()`.

  Unlike TFF's `ServiceManager`, a worker that died is not silently restarted (a crash is usually
  an out-of-memory kill that would recur): the call fails with the exit status and the worker's
  last output. The next call starts a fresh worker.
  """

  def __init__(
      self,
      max_concurrent_computation_calls: int,
      startup_timeout_s: float,
      intra_op_threads: Optional[int],
  ):
    self._max_concurrent_computation_calls = max_concurrent_computation_calls
    self._startup_timeout_s = startup_timeout_s
    self._intra_op_threads = intra_op_threads
    self._lock = threading.Lock()
    self._worker: Optional[WorkerProcess] = None
    self._channel: Optional[grpc.Channel] = None
    self._stub: Optional[tff.framework.RemoteExecutorGrpcStub] = None
    self._closed = False

  def get_stub(self) -> tff.framework.RemoteExecutorGrpcStub:
    with self._lock:
      if self._closed:
        raise RuntimeError(
            'This local TFF execution context was closed (replaced or reset by '
            '`tff_clipq.runtime`); use the current default context.'
        )
      if self._worker is not None and not self._worker.is_running():
        worker = self._worker
        last_output = worker.log_tail()
        self._discard()
        raise RuntimeError(
            f'The local TFF worker (pid {worker.pid}) died with status {worker.returncode} '
            f'(negative: killed by that signal; -9 is often the out-of-memory killer). Its last '
            f'output:\n{last_output}\nThe next computation call starts a new worker.'
        )
      if self._worker is None:
        (worker,) = _start_serving_workers(
            1,
            self._max_concurrent_computation_calls,
            self._startup_timeout_s,
            self._intra_op_threads,
        )
        self._worker = worker
        self._channel = grpc.insecure_channel(worker.address, options=_GRPC_CHANNEL_OPTIONS)
        self._stub = tff.framework.RemoteExecutorGrpcStub(_UnsubscribedChannel(self._channel))
      return self._stub

  def _discard(self) -> None:
    if self._channel is not None:
      self._channel.close()
    if self._worker is not None:
      self._worker.stop()
    self._worker = self._channel = self._stub = None

  def close(self) -> None:
    with self._lock:
      self._closed = True
      self._discard()


@dataclasses.dataclass
class _OwnedResources:
  """What a context created here owns and must release when it is replaced or left."""

  services: list[_LocalWorkerService] = dataclasses.field(default_factory=list)
  channels: list[grpc.Channel] = dataclasses.field(default_factory=list)
  workers: list[WorkerProcess] = dataclasses.field(default_factory=list)

  def close(self) -> None:
    for service in self.services:
      service.close()
    for channel in self.channels:
      channel.close()
    _stop_workers(self.workers)


def _native_context_kwargs() -> dict[str, object]:
  """Compiler and argument/result transforms of TFF's native C++ contexts."""
  return dict(
      compiler_fn=tff.backends.native.desugar_and_transform_to_native,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result,
  )


def _create_local_context(
    default_num_clients: int,
    max_concurrent_computation_calls: int,
    startup_timeout_s: float,
    intra_op_threads: Optional[int],
) -> tuple[tff.framework.SyncContext, _OwnedResources]:
  _check_int(default_num_clients, 'default_num_clients', minimum=0)
  _check_int(max_concurrent_computation_calls, 'max_concurrent_computation_calls')
  _check_positive(startup_timeout_s, 'startup_timeout_s')
  _check_intra_op_threads(intra_op_threads)
  service = _LocalWorkerService(
      max_concurrent_computation_calls, startup_timeout_s, intra_op_threads
  )
  context = tff.framework.SyncExecutionContext(
      executor_fn=_executor_factory(service.get_stub, default_num_clients),
      **_native_context_kwargs(),
  )
  return context, _OwnedResources(services=[service])


def _create_remote_context(
    worker_addresses: Sequence[str],
    default_num_clients: int,
    num_subrounds: Optional[int],
    connect_timeout_s: float,
    reconnect_timeout_s: float,
    rpc_timeout_s: Optional[float],
) -> tuple[tff.framework.MergeableCompExecutionContext, _OwnedResources]:
  addresses = _check_addresses(worker_addresses)
  _check_int(default_num_clients, 'default_num_clients', minimum=0)
  if num_subrounds is not None:
    _check_int(num_subrounds, 'num_subrounds', minimum=1)
  _check_positive(connect_timeout_s, 'connect_timeout_s')
  _check_positive(reconnect_timeout_s, 'reconnect_timeout_s')
  _check_positive(rpc_timeout_s, 'rpc_timeout_s', allow_none=True)

  channels = [grpc.insecure_channel(a, options=_GRPC_CHANNEL_OPTIONS) for a in addresses]
  resources = _OwnedResources(channels=channels)
  try:
    probes = [_probe(c, connect_timeout_s) for c in channels]
    outcomes = {a: p.result() for a, p in zip(addresses, probes)}
    unreachable = [a for a, o in outcomes.items() if o is _Probe.UNREACHABLE]
    if unreachable:
      raise WorkerUnavailableError(
          unreachable[0],
          f'Could not reach TFF worker(s) {", ".join(unreachable)} within {connect_timeout_s:g} '
          's. Is `worker_binary --port=PORT` running there, and is the port open?',
      )
    not_tff = [a for a, o in outcomes.items() if o is _Probe.NOT_A_TFF_WORKER]
    if not_tff:
      raise WorkerUnavailableError(
          not_tff[0],
          f'The gRPC server(s) at {", ".join(not_tff)} do not serve TFF\'s executor service; '
          'expected `worker_binary` processes.',
      )
    async_contexts = []
    for address, channel in zip(addresses, channels):
      stub = _BoundedRetryStub(address, channel, reconnect_timeout_s, rpc_timeout_s)
      async_contexts.append(
          tff.framework.AsyncExecutionContext(
              executor_fn=_executor_factory(lambda stub=stub: stub, default_num_clients),
              **_native_context_kwargs(),
          )
      )
    context = tff.framework.MergeableCompExecutionContext(
        async_contexts,
        compiler_fn=tff.backends.native.compile_to_mergeable_comp_form,
        num_subrounds=num_subrounds,
    )
  except BaseException:
    resources.close()
    raise
  return context, resources


_default_lock = threading.Lock()
_default_resources: Optional[_OwnedResources] = None


def _set_default(context: tff.framework.SyncContext, resources: _OwnedResources) -> None:
  """Installs `context` as TFF's default and releases what the previous one set here owned."""
  global _default_resources
  with _default_lock:
    previous, _default_resources = _default_resources, resources
    tff.framework.set_default_context(context)
  if previous is not None:
    previous.close()


def set_local_execution_context(
    default_num_clients: int = 0,
    max_concurrent_computation_calls: int = -1,
    *,
    startup_timeout_s: float = 60.0,
    intra_op_threads: Optional[int] = None,
) -> None:
  """Installs a local C++ context, like TFF's default, whose worker cannot outlive Python.

  Same compiler and transforms as `tff.backends.native.set_sync_local_cpp_execution_context`. The
  worker starts on the first computation call and is stopped when this context is replaced by
  another one set here, by `reset_execution_context()`, or at exit. Calling this again replaces
  the context (and stops its worker).

  Args:
    default_num_clients: Number of clients when it cannot be inferred from the arguments.
    max_concurrent_computation_calls: Passed to the worker; nonpositive means no limit.
    startup_timeout_s: How long the first call waits for the worker to serve.
    intra_op_threads: Threads each TensorFlow operation of the worker may use
      (see the module docstring); None: TensorFlow's default, one per core.
  """
  _set_default(
      *_create_local_context(
          default_num_clients, max_concurrent_computation_calls, startup_timeout_s,
          intra_op_threads,
      )
  )


def set_remote_execution_context(
    worker_addresses: Sequence[str],
    default_num_clients: int = 0,
    *,
    num_subrounds: Optional[int] = None,
    connect_timeout_s: float = 30.0,
    reconnect_timeout_s: float = 10.0,
    rpc_timeout_s: Optional[float] = None,
) -> None:
  """Installs a context that runs computations across TFF workers at `worker_addresses`.

  One `tff.framework.AsyncExecutionContext` per worker, combined by a
  `tff.framework.MergeableCompExecutionContext`: each computation is compiled to mergeable form
  (up-to-merge, merge, after-merge) and the CLIENTS-placed arguments are split across the workers.
  Computations whose aggregations depend on one another cannot be compiled to that form.
  The workers are not owned by the context (see `start_local_workers`); its channels are closed
  when it is replaced or reset.

  Args:
    worker_addresses: `host:port` of each worker (`[::1]:port` for IPv6 hosts).
    default_num_clients: Number of clients of a worker when it cannot be inferred.
    num_subrounds: Number of parts the clients are split into; defaults to the number of workers.
    connect_timeout_s: How long to wait for every worker to be reachable before failing.
    reconnect_timeout_s: After a worker failed with UNAVAILABLE, how long to wait for it to be
      reachable again before the computation call raises `WorkerUnavailableError`.
    rpc_timeout_s: Deadline for each RPC; None means none (a hung, not dead, worker then blocks).

  Raises:
    ValueError: If an argument is invalid, e.g. an address is not `host:port`.
    WorkerUnavailableError: If a worker is not reachable within `connect_timeout_s`.
  """
  _set_default(
      *_create_remote_context(
          worker_addresses,
          default_num_clients,
          num_subrounds,
          connect_timeout_s,
          reconnect_timeout_s,
          rpc_timeout_s,
      )
  )


def reset_execution_context() -> None:
  """Releases what the default context set here owns, and installs a fresh local context.

  The fresh context starts no worker until a computation runs, so afterwards this module has no
  worker running on behalf of the default context.
  """
  set_local_execution_context()


@contextlib.contextmanager
def execution_context(
    workers: Optional[Sequence[str]] = None,
    num_local_workers: int = 0,
    *,
    default_num_clients: int = 0,
    max_concurrent_computation_calls: int = -1,
    startup_timeout_s: float = 60.0,
    connect_timeout_s: float = 30.0,
    reconnect_timeout_s: float = 10.0,
    rpc_timeout_s: Optional[float] = None,
    intra_op_threads: Optional[int] = None,
) -> Iterator[tuple[str, ...]]:
  """Runs the `with` body under a TFF context whose workers and channels are released on exit.

  * `workers` given: a remote context over those `host:port` workers (not stopped on exit).
  * `num_local_workers > 0`: starts that many local workers and a remote context over them; the
    workers are stopped on exit. Useful to test the multi-worker path on one machine.
  * neither: a local single-worker context, as `set_local_execution_context`.

  The context is pushed on TFF's (thread-local) context stack, so the previous default is in
  force again after the block, even if it raised.

  Yields:
    The worker addresses in use (empty for the local context).

  Raises:
    ValueError: If both `workers` and `num_local_workers` are given, `intra_op_threads` is given
      with `workers`, or an argument is invalid.
  """
  _check_int(num_local_workers, 'num_local_workers', minimum=0)
  if workers is not None and num_local_workers:
    raise ValueError(
        'Pass either `workers` or `num_local_workers`, not both. '
        f'Found workers={workers!r}, num_local_workers={num_local_workers}.'
    )
  if workers is not None and intra_op_threads is not None:
    raise ValueError(
        '`intra_op_threads` applies to workers started here, not to `workers` started '
        f'elsewhere. Found workers={workers!r}, intra_op_threads={intra_op_threads!r}.'
    )
  owned_workers: list[WorkerProcess] = []
  try:
    if num_local_workers:
      owned_workers = start_local_workers(
          num_local_workers,
          max_concurrent_computation_calls=max_concurrent_computation_calls,
          startup_timeout_s=startup_timeout_s,
          intra_op_threads=intra_op_threads,
      )
      workers = [w.address for w in owned_workers]
    if workers is not None:
      context, resources = _create_remote_context(
          workers,
          default_num_clients,
          None,
          connect_timeout_s,
          reconnect_timeout_s,
          rpc_timeout_s,
      )
      addresses = tuple(workers)
    else:
      context, resources = _create_local_context(
          default_num_clients, max_concurrent_computation_calls, startup_timeout_s,
          intra_op_threads,
      )
      addresses = ()
  except BaseException:
    _stop_workers(owned_workers)
    raise
  resources.workers.extend(owned_workers)
  try:
    with tff.framework.get_context_stack().install(context):
      yield addresses
  finally:
    resources.close()
