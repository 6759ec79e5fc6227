"""gRPC pieces of `tff_clipq.runtime`: probing TFF workers, and calls that fail in bounded time.

`probe` tells a TFF worker from a dead address or another gRPC server. `BoundedRetryStub` is TFF's
`RemoteExecutorGrpcStub` for one worker, except that a worker that stays unreachable (or an RPC
that runs past its deadline) makes the call raise `WorkerUnavailableError` instead of being retried
forever by TFF's `AsyncExecutionContext`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import concurrent.futures
import enum
from typing import Optional

from absl import logging
import grpc
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.proto.v0 import executor_pb2_grpc
from tensorflow_federated.python.core.impl.executors import executors_errors

# Same message-size options as TFF's own local context (executor_stacks/executor_factory.py).
_GRPC_MAX_MESSAGE_LENGTH_BYTES = 2 * 1000 * 1000 * 1000
GRPC_CHANNEL_OPTIONS = (
  ('grpc.max_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
  ('grpc.max_receive_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
  ('grpc.max_send_message_length', _GRPC_MAX_MESSAGE_LENGTH_BYTES),
  # gRPC backs off up to 120 s between reconnection attempts by default; a restarted worker
  # should be seen within seconds.
  ('grpc.max_reconnect_backoff_ms', 2000),
)
# A worker that answers with a retryable gRPC error while reachable is retried (by TFF's
# AsyncExecutionContext) at most this many times in a row before the call fails.
_MAX_CONSECUTIVE_RETRIES = 3


class WorkerUnavailableError(RuntimeError):
  """A TFF worker could not be reached (dead, stopped, hung or wrong address).

  Args:
    address: The `host:port` of the worker.
    message: The error message.

  Attributes:
    address: The `host:port` of the worker.
  """

  def __init__(self, address: str, message: str):
    super().__init__(message)
    self.address = address


class Probe(enum.Enum):
  TFF_WORKER = 'a TFF worker answered'
  NOT_A_TFF_WORKER = "a gRPC server without TFF's executor service answered"
  UNREACHABLE = 'nothing answered'


# What a probe fails with when no server answered it.
_NO_ANSWER_CODES = frozenset(
  {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
  }
)


def probe(channel: grpc.Channel, timeout_s: float) -> concurrent.futures.Future:
  """Starts a DisposeExecutor RPC for no executor, which a TFF worker answers with OK.

  `wait_for_ready` makes the RPC wait (up to `timeout_s`) for a connection instead of failing at
  once. A probe RPC rather than `grpc.channel_ready_future`: that one subscribes to connectivity
  changes, whose gRPC polling thread raises if the channel is closed while it polls.

  Args:
    channel: A gRPC channel to the address to probe.
    timeout_s: Deadline of the probe RPC, in seconds.

  Returns:
    A future of a `Probe`.
  """
  outcome: concurrent.futures.Future = concurrent.futures.Future()
  call = executor_pb2_grpc.ExecutorGroupStub(channel).DisposeExecutor.future(
    executor_pb2.DisposeExecutorRequest(), timeout=timeout_s, wait_for_ready=True
  )

  def classify(done_call: grpc.Future) -> None:
    error = done_call.exception()
    code = error.code() if isinstance(error, grpc.Call) else None
    if error is not None and (code is None or code in _NO_ANSWER_CODES):
      outcome.set_result(Probe.UNREACHABLE)
    elif code == grpc.StatusCode.UNIMPLEMENTED:
      outcome.set_result(Probe.NOT_A_TFF_WORKER)
    else:
      outcome.set_result(Probe.TFF_WORKER)  # OK, or the worker's own error.

  call.add_done_callback(classify)
  return outcome


class UnsubscribedChannel(grpc.Channel):
  """Delegates to `channel`, except that `subscribe` does nothing.

  `tff.framework.RemoteExecutorGrpcStub` subscribes to connectivity changes only to serve its
  `is_ready`, which these contexts never read; the subscription's gRPC polling thread raises
  'Channel closed!' when the channel is closed while it polls.
  """

  def __init__(self, channel: grpc.Channel):
    self._channel = channel

  def subscribe(self, callback, try_to_connect=False):
    """Does nothing: connectivity changes are not reported.

    Args:
      callback: Ignored.
      try_to_connect: Ignored.
    """
    del callback, try_to_connect

  def unsubscribe(self, callback):
    del callback

  def unary_unary(self, *args, **kwargs):
    """The wrapped channel's `unary_unary`.

    Args:
      *args: Passed on to the wrapped channel.
      **kwargs: Passed on to the wrapped channel.
    """
    return self._channel.unary_unary(*args, **kwargs)

  def unary_stream(self, *args, **kwargs):
    """The wrapped channel's `unary_stream`.

    Args:
      *args: Passed on to the wrapped channel.
      **kwargs: Passed on to the wrapped channel.
    """
    return self._channel.unary_stream(*args, **kwargs)

  def stream_unary(self, *args, **kwargs):
    """The wrapped channel's `stream_unary`.

    Args:
      *args: Passed on to the wrapped channel.
      **kwargs: Passed on to the wrapped channel.
    """
    return self._channel.stream_unary(*args, **kwargs)

  def stream_stream(self, *args, **kwargs):
    """The wrapped channel's `stream_stream`.

    Args:
      *args: Passed on to the wrapped channel.
      **kwargs: Passed on to the wrapped channel.
    """
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


class BoundedRetryStub(tff.framework.RemoteExecutorStub):
  """`tff.framework.RemoteExecutorGrpcStub` for one worker, whose failures end in bounded time.

  TFF's `AsyncExecutionContext` retries a call that failed with UNAVAILABLE or FAILED_PRECONDITION
  forever (30 s apart), so a dead worker hangs the computation. Here such an error is passed on to
  TFF's retry only if the worker is reachable again within `reconnect_timeout_s` (e.g. restarted),
  at most `_MAX_CONSECUTIVE_RETRIES` times in a row; otherwise the call raises
  `WorkerUnavailableError`, as does a call that ran past an RPC deadline.

  Args:
    address: The worker's `host:port`, for error messages.
    channel: A gRPC channel to the worker.
    reconnect_timeout_s: After a retryable error, how long to wait for the worker to be reachable
      again before raising `WorkerUnavailableError`.
    rpc_timeout_s: Deadline given to each RPC that has none; None means none.
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
    self._stub = tff.framework.RemoteExecutorGrpcStub(UnsubscribedChannel(rpc_channel))
    self._consecutive_retries = 0

  def _reachable_within(self, timeout_s: float) -> bool:
    return probe(self._channel, timeout_s).result() is Probe.TFF_WORKER

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
