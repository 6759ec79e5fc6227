"""TFF execution contexts over workers that `tff_clipq.runtime` owns, and TFF's default context.

* local (`set_local_execution_context`): one worker, started on first use, compiled as
  `tff.backends.native.set_sync_local_cpp_execution_context`;
* remote (`set_remote_execution_context`): `worker_binary` processes at `host:port` addresses,
  combined by a `tff.framework.MergeableCompExecutionContext`;
* `execution_context()`: either of them for the duration of a `with` block.

Replacing or resetting a context set here releases what it owned (its worker, its channels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import os
import threading
from typing import Optional

import grpc
import tensorflow_federated as tff

from tff_clipq.runtime import checks
from tff_clipq.runtime import grpc_stub
from tff_clipq.runtime import workers as workers_lib


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
    self._worker: Optional[workers_lib.WorkerProcess] = None
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
        (worker,) = workers_lib.start_serving_workers(
          1,
          self._max_concurrent_computation_calls,
          self._startup_timeout_s,
          self._intra_op_threads,
        )
        self._worker = worker
        self._channel = grpc.insecure_channel(
          worker.address, options=grpc_stub.GRPC_CHANNEL_OPTIONS
        )
        self._stub = tff.framework.RemoteExecutorGrpcStub(
          grpc_stub.UnsubscribedChannel(self._channel)
        )
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
  workers: list[workers_lib.WorkerProcess] = dataclasses.field(default_factory=list)

  def close(self) -> None:
    for service in self.services:
      service.close()
    for channel in self.channels:
      channel.close()
    workers_lib.stop_workers(self.workers)


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
  checks.check_int(default_num_clients, 'default_num_clients', minimum=0)
  checks.check_int(max_concurrent_computation_calls, 'max_concurrent_computation_calls')
  checks.check_positive(startup_timeout_s, 'startup_timeout_s')
  checks.check_intra_op_threads(intra_op_threads)
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
  addresses = checks.check_addresses(worker_addresses)
  checks.check_int(default_num_clients, 'default_num_clients', minimum=0)
  if num_subrounds is not None:
    checks.check_int(num_subrounds, 'num_subrounds', minimum=1)
  checks.check_positive(connect_timeout_s, 'connect_timeout_s')
  checks.check_positive(reconnect_timeout_s, 'reconnect_timeout_s')
  checks.check_positive(rpc_timeout_s, 'rpc_timeout_s', allow_none=True)

  channels = [grpc.insecure_channel(a, options=grpc_stub.GRPC_CHANNEL_OPTIONS) for a in addresses]
  resources = _OwnedResources(channels=channels)
  try:
    probes = [grpc_stub.probe(c, connect_timeout_s) for c in channels]
    outcomes = {a: p.result() for a, p in zip(addresses, probes)}
    unreachable = [a for a, o in outcomes.items() if o is grpc_stub.Probe.UNREACHABLE]
    if unreachable:
      raise grpc_stub.WorkerUnavailableError(
        unreachable[0],
        f'Could not reach TFF worker(s) {", ".join(unreachable)} within {connect_timeout_s:g} '
        's. Is `worker_binary --port=PORT` running there, and is the port open?',
      )
    not_tff = [a for a, o in outcomes.items() if o is grpc_stub.Probe.NOT_A_TFF_WORKER]
    if not_tff:
      raise grpc_stub.WorkerUnavailableError(
        not_tff[0],
        f"The gRPC server(s) at {', '.join(not_tff)} do not serve TFF's executor service; "
        'expected `worker_binary` processes.',
      )
    async_contexts = []
    for address, channel in zip(addresses, channels):
      stub = grpc_stub.BoundedRetryStub(address, channel, reconnect_timeout_s, rpc_timeout_s)
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


def _after_fork_in_child() -> None:
  """A forked child (e.g. `multiprocessing`) owns none of its parent's contexts.

  The lock is replaced too: another thread of the parent may have held it at the fork.
  """
  global _default_lock, _default_resources
  _default_lock, _default_resources = threading.Lock(), None


os.register_at_fork(after_in_child=_after_fork_in_child)


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
      (see the `tff_clipq.runtime` docstring); None: TensorFlow's default, one per core.
  """
  _set_default(
    *_create_local_context(
      default_num_clients,
      max_concurrent_computation_calls,
      startup_timeout_s,
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

  The fresh context starts no worker until a computation runs, so afterwards `tff_clipq.runtime`
  has no worker running on behalf of the default context.
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

  Args:
    workers: `host:port` of each running worker to use, or None.
    num_local_workers: Number of local workers to start (0: none); not with `workers`.
    default_num_clients: Number of clients when it cannot be inferred from the arguments.
    max_concurrent_computation_calls: Passed to the workers started here; nonpositive means no
      limit.
    startup_timeout_s: How long to wait for a worker started here to serve.
    connect_timeout_s: Remote context: how long to wait for every worker to be reachable.
    reconnect_timeout_s: Remote context: after a worker failed with UNAVAILABLE, how long to wait
      for it to be reachable again before the call raises `WorkerUnavailableError`.
    rpc_timeout_s: Remote context: deadline for each RPC; None means none.
    intra_op_threads: Threads each TensorFlow operation of a worker started here may use; None:
      TensorFlow's default. Not with `workers`.

  Yields:
    The worker addresses in use (empty for the local context).

  Raises:
    ValueError: If both `workers` and `num_local_workers` are given, `intra_op_threads` is given
      with `workers`, or an argument is invalid.
  """
  checks.check_int(num_local_workers, 'num_local_workers', minimum=0)
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
  owned_workers: list[workers_lib.WorkerProcess] = []
  try:
    if num_local_workers:
      owned_workers = workers_lib.start_local_workers(
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
        default_num_clients,
        max_concurrent_computation_calls,
        startup_timeout_s,
        intra_op_threads,
      )
      addresses = ()
  except BaseException:
    workers_lib.stop_workers(owned_workers)
    raise
  resources.workers.extend(owned_workers)
  try:
    with tff.framework.get_context_stack().install(context):
      yield addresses
  finally:
    resources.close()
