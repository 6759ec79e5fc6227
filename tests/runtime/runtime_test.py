"""Tests for `tff_clipq.runtime`: results, worker ownership (no orphans), remote failures."""

from __future__ import annotations

import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap
import time
from typing import Optional
from unittest import mock

from absl.testing import parameterized
import numpy as np
import portpicker
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.types import type_conversions

from tff_clipq import runtime
from tff_clipq.runtime import workers as runtime_workers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIENT_FLOATS = tff.FederatedType(np.float32, tff.CLIENTS)
CLIENT_VALUES = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def _pid_gone(pid: int, timeout_s: float = 0.0) -> bool:
  """True once `pid` no longer runs (absent, or a zombie nobody reaped yet) within `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      state = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
      return True
    if state in ('Z', 'X'):
      return True
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.05)


@tff.federated_computation(CLIENT_FLOATS)
def federated_total(values):
  return tff.federated_sum(values)


@tff.federated_computation(CLIENT_FLOATS)
def federated_average(values):
  return tff.federated_mean(values)


@tff.tensorflow.computation(np.float32)
def add_one(x):
  return x + 1.0


# A custom aggregation on `tff.federated_aggregate`: (sum, number of merges). The merge count shows
# how many partial aggregates were merged, i.e. whether the clients were split.
@tff.tensorflow.computation
def _zero():
  return (np.float32(0.0), np.int32(0))


@tff.tensorflow.computation((np.float32, np.int32), np.float32)
def _accumulate(accumulator, value):
  return (accumulator[0] + value, accumulator[1])


@tff.tensorflow.computation((np.float32, np.int32), (np.float32, np.int32))
def _merge(a, b):
  return (a[0] + b[0], a[1] + b[1] + 1)


@tff.tensorflow.computation((np.float32, np.int32))
def _report(accumulator):
  return accumulator


@tff.federated_computation(CLIENT_FLOATS)
def sum_and_merge_count(values):
  return tff.federated_aggregate(values, _zero(), _accumulate, _merge, _report)


@tff.tensorflow.computation(np.float32, np.float32)
def _squared_difference(a, b):
  return (a - b) * (a - b)


@tff.federated_computation(CLIENT_FLOATS)
def federated_variance(values):
  """Two dependent aggregations: the mean must be known before the second one starts."""
  mean_at_clients = tff.federated_broadcast(tff.federated_mean(values))
  return tff.federated_mean(tff.federated_map(_squared_difference, (values, mean_at_clients)))


class SumViaAggregateFactory(tff.aggregators.UnweightedAggregationFactory):
  """Sums client structures with `tff.federated_aggregate` (custom accumulate/merge/report)."""

  def create(self, value_type):
    specs = type_conversions.type_to_tf_tensor_specs(value_type)

    @tff.tensorflow.computation
    def zeros():
      return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), specs)

    @tff.tensorflow.computation(value_type, value_type)
    def add(a, b):
      return tf.nest.map_structure(tf.add, a, b)

    @tff.tensorflow.computation(value_type)
    def identity(a):
      return a

    @tff.federated_computation()
    def init_fn():
      return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
      init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS)
    )
    def next_fn(state, value):
      total = tff.federated_aggregate(value, zeros(), add, add, identity)
      return tff.templates.MeasuredProcessOutput(state, total, tff.federated_value((), tff.SERVER))

    return tff.templates.AggregationProcess(init_fn, next_fn)


def _model_fn() -> tff.learning.models.VariableModel:
  keras_model = tf.keras.Sequential(
    [
      tf.keras.layers.Input(shape=(3,)),
      tf.keras.layers.Dense(2, kernel_initializer='ones'),
    ]
  )
  return tff.learning.models.from_keras_model(
    keras_model,
    input_spec=(tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([None], tf.int32)),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
  )


def _client_datasets(num_clients: int = 4) -> list[tf.data.Dataset]:
  rng = np.random.default_rng(0)
  return [
    tf.data.Dataset.from_tensor_slices(
      (
        rng.normal(size=(5, 3)).astype(np.float32),
        rng.integers(0, 2, size=5).astype(np.int32),
      )
    ).batch(2)
    for _ in range(num_clients)
  ]


def _run_fed_avg(process, datasets, rounds: int = 2):
  state = process.initialize()
  for _ in range(rounds):
    output = process.next(state, datasets)
    state = output.state
  return process.get_model_weights(state).trainable, output.metrics['client_work']['train']


class RuntimeTestCase(tf.test.TestCase):
  """Every test ends with the default context reset and no worker of this module running."""

  def setUp(self):
    super().setUp()
    self.workers: list[runtime.WorkerProcess] = []

  def tearDown(self):
    runtime.reset_execution_context()
    for worker in self.workers:
      if worker.is_running():
        os.kill(worker.pid, signal.SIGCONT)  # In case a test stopped it.
      worker.stop()
    self.assertEqual(runtime.live_worker_pids(), [])
    super().tearDown()

  def start_workers(self, num_workers: int) -> list[runtime.WorkerProcess]:
    self.workers.extend(runtime.start_local_workers(num_workers))
    return self.workers[-num_workers:]


class LocalContextTest(RuntimeTestCase):
  def test_computations_give_right_answers_and_replacing_stops_the_worker(self):
    runtime.set_local_execution_context()
    self.assertEqual(runtime.live_worker_pids(), [])  # Started on first use, as TFF does.
    self.assertAllClose(federated_total(CLIENT_VALUES), 21.0)
    self.assertAllClose(add_one(1.5), 2.5)
    (first_pid,) = runtime.live_worker_pids()

    runtime.set_local_execution_context()  # Replaces the context: its worker must be gone.
    self.assertTrue(_pid_gone(first_pid))
    self.assertEqual(runtime.live_worker_pids(), [])
    self.assertAllClose(federated_average(CLIENT_VALUES), 3.5)
    (second_pid,) = runtime.live_worker_pids()
    self.assertNotEqual(second_pid, first_pid)

    runtime.reset_execution_context()
    self.assertTrue(_pid_gone(second_pid))

  def test_dead_worker_fails_the_next_call_then_a_new_worker_starts(self):
    runtime.set_local_execution_context()
    self.assertAllClose(federated_total([1.0, 2.0]), 3.0)
    (pid,) = runtime.live_worker_pids()
    os.kill(pid, signal.SIGKILL)
    self.assertTrue(_pid_gone(pid, timeout_s=5))
    with self.assertRaisesRegex(RuntimeError, rf'local TFF worker \(pid {pid}\) died'):
      federated_total([1.0, 2.0])
    self.assertAllClose(federated_total([1.0, 2.0]), 3.0)

  def test_execution_context_block_cleans_up_even_on_error(self):
    with runtime.execution_context() as addresses:
      self.assertEqual(addresses, ())
      self.assertAllClose(federated_total(CLIENT_VALUES), 21.0)
      (pid,) = runtime.live_worker_pids()
    self.assertTrue(_pid_gone(pid))
    with self.assertRaisesRegex(KeyError, 'inside'):
      with runtime.execution_context():
        federated_total(CLIENT_VALUES)
        (pid,) = runtime.live_worker_pids()
        raise KeyError('inside')
    self.assertTrue(_pid_gone(pid))

  def test_forked_child_does_not_own_or_stop_the_parents_worker(self):
    runtime.set_local_execution_context()
    self.assertAllClose(federated_total([1.0, 2.0]), 3.0)
    (pid,) = runtime.live_worker_pids()
    child = os.fork()
    if child == 0:  # As a `multiprocessing` fork child: sees no worker, stops none at its exit.
      status = 0 if runtime.live_worker_pids() == [] else 3
      # What atexit would run.
      runtime_workers._stop_all_workers()  # pylint: disable=protected-access
      os._exit(status)
    _, status = os.waitpid(child, 0)
    self.assertEqual(os.waitstatus_to_exitcode(status), 0)
    self.assertEqual(runtime.live_worker_pids(), [pid])
    self.assertAllClose(federated_total([1.0, 2.0]), 3.0)

  def test_intra_op_threads_reach_the_worker_environment(self):
    def worker_setting() -> Optional[str]:
      (pid,) = runtime.live_worker_pids()
      with open(f'/proc/{pid}/environ', 'rb') as environ:
        entries = dict(
          entry.split(b'=', 1) for entry in environ.read().split(b'\0') if b'=' in entry
        )
      value = entries.get(b'TF_NUM_INTRAOP_THREADS')
      return value.decode() if value is not None else None

    runtime.set_local_execution_context(intra_op_threads=1)
    self.assertAllClose(federated_total([1.0, 2.0]), 3.0)
    self.assertEqual(worker_setting(), '1')
    runtime.set_local_execution_context()  # None: inherits this process's environment.
    self.assertAllClose(federated_total([1.0, 2.0]), 3.0)
    self.assertEqual(worker_setting(), os.environ.get('TF_NUM_INTRAOP_THREADS'))
    runtime.reset_execution_context()  # Stops that worker: the next one is the only one.
    with runtime.execution_context(num_local_workers=1, intra_op_threads=2):
      self.assertAllClose(federated_total([1.0, 2.0]), 3.0)
      self.assertEqual(worker_setting(), '2')

  def test_invalid_arguments(self):
    for threads in (0, -1, 1.5, True):
      with self.assertRaisesRegex(ValueError, '`intra_op_threads`'):
        runtime.set_local_execution_context(intra_op_threads=threads)
    with self.assertRaisesRegex(ValueError, '`intra_op_threads` applies to workers started here'):
      with runtime.execution_context(['localhost:1'], intra_op_threads=1):
        pass
    with self.assertRaisesRegex(ValueError, '`default_num_clients`.*-1'):
      runtime.set_local_execution_context(default_num_clients=-1)
    with self.assertRaisesRegex(ValueError, '`num_workers`.*0'):
      runtime.start_local_workers(0)
    with self.assertRaisesRegex(ValueError, 'not both'):
      with runtime.execution_context(['localhost:1'], num_local_workers=1):
        pass


class WorkerStartTest(RuntimeTestCase):
  def _fake_binary(self, body: str) -> str:
    path = os.path.join(self.get_temp_dir(), 'fake_worker')
    pathlib.Path(path).write_text(f'#!/bin/sh\n{body}\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path

  def test_binary_exiting_at_start_raises_with_its_output(self):
    path = self._fake_binary('echo "no luck today" >&2; exit 3')
    with mock.patch.object(runtime_workers, 'WORKER_BINARY_PATH', path):
      with self.assertRaisesRegex(runtime.WorkerStartError, r'(?s)status 3.*no luck today'):
        runtime.start_local_workers(2)

  def test_binary_not_serving_times_out_and_is_stopped(self):
    path = self._fake_binary('exec sleep 60')
    with mock.patch.object(runtime_workers, 'WORKER_BINARY_PATH', path):
      start = time.monotonic()
      with self.assertRaisesRegex(runtime.WorkerStartError, 'did not serve'):
        runtime.start_local_workers(1, startup_timeout_s=0.5)
      self.assertLess(time.monotonic() - start, 10)


_CHILD_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import tensorflow_federated as tff
    from tff_clipq import runtime

    runtime.set_local_execution_context()

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(values):
      return tff.federated_sum(values)

    assert total([1.0, 2.0]) == 3.0
    print('WORKER_PID', runtime.live_worker_pids()[0], flush=True)
    if sys.argv[1] == 'sigkill':
      os.kill(os.getpid(), signal.SIGKILL)  # Nothing runs at all, atexit handlers included.
""")


class ProcessExitTest(RuntimeTestCase):
  def test_worker_dies_with_python_and_never_holds_its_pipes(self):
    # `python script.py | cat`: communicate() returns only once every writer of the pipes has
    # closed them, so a worker that inherited them (as TFF's does) would make it time out.
    # 'normal' exercises the atexit handler; 'sigkill' the kernel's parent-death signal, which also
    # covers `os._exit` (no atexit handlers either).
    modes = ('normal', 'sigkill')
    children = {  # Run concurrently: each one spends ~10 s importing TFF.
      mode: subprocess.Popen(
        [sys.executable, '-c', _CHILD_SCRIPT, mode],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for mode in modes
    }
    for mode, child in children.items():
      with self.subTest(mode=mode):
        try:
          stdout, stderr = child.communicate(timeout=120)
        except subprocess.TimeoutExpired:
          child.kill()
          child.communicate()
          self.fail(f'{mode}: the pipes stayed open (or the child hung).')
        self.assertIn('WORKER_PID', stdout, msg=stderr[-3000:])
        worker_pid = int(stdout.split('WORKER_PID')[1].split()[0])
        self.assertEqual(child.returncode, -signal.SIGKILL if mode == 'sigkill' else 0)
        self.assertTrue(_pid_gone(worker_pid, timeout_s=10), f'{mode}: orphaned worker')


class RemoteContextTest(RuntimeTestCase, parameterized.TestCase):
  def test_two_workers_match_the_local_context(self):
    computations = {
      'sum': federated_total,
      'mean': federated_average,
      'aggregate': sum_and_merge_count,
    }
    runtime.set_local_execution_context()
    local = {name: comp(CLIENT_VALUES) for name, comp in computations.items()}
    local['tensorflow'] = add_one(1.5)

    workers = self.start_workers(2)
    runtime.set_remote_execution_context([w.address for w in workers])
    remote = {name: comp(CLIENT_VALUES) for name, comp in computations.items()}
    remote['tensorflow'] = add_one(1.5)

    self.assertAllClose(local['sum'], 21.0)
    self.assertAllClose(local['mean'], 3.5)
    self.assertAllClose(local['tensorflow'], 2.5)
    for name in ('sum', 'mean', 'tensorflow'):
      self.assertAllClose(remote[name], local[name], msg=name)
    self.assertAllClose(remote['aggregate'][0], 21.0)
    # How the aggregate was computed differs: one worker holds all clients (no merge), while two
    # workers each aggregate half of the clients and one merge joins the halves.
    self.assertEqual(local['aggregate'][1], 0)
    self.assertEqual(remote['aggregate'][1], 1)
    self.assertLen(runtime.live_worker_pids(), 2)

  def test_fed_avg_with_default_and_custom_aggregators_matches_local(self):
    datasets = _client_datasets(4)
    processes = {
      'mean_factory': tff.learning.algorithms.build_weighted_fed_avg(
        _model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
      ),
      'federated_aggregate': tff.learning.algorithms.build_weighted_fed_avg(
        _model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
        model_aggregator=tff.aggregators.MeanFactory(
          value_sum_factory=SumViaAggregateFactory(),
          weight_sum_factory=SumViaAggregateFactory(),
        ),
      ),
    }
    runtime.set_local_execution_context()
    local = {name: _run_fed_avg(p, datasets) for name, p in processes.items()}
    workers = self.start_workers(2)
    runtime.set_remote_execution_context([w.address for w in workers])
    remote = {name: _run_fed_avg(p, datasets) for name, p in processes.items()}

    for name in processes:
      with self.subTest(name):
        local_weights, local_metrics = local[name]
        remote_weights, remote_metrics = remote[name]
        self.assertAllClose(remote_weights, local_weights, rtol=1e-5, atol=1e-6)
        self.assertEqual(remote_metrics['num_examples'], 20)
        self.assertAllClose(remote_metrics, local_metrics, rtol=1e-5, atol=1e-6)
    # The model moved, and the custom aggregator computed the same mean as MeanFactory.
    self.assertNotAllClose(local['mean_factory'][0][0], np.ones([3, 2]))
    self.assertAllClose(local['federated_aggregate'][0], local['mean_factory'][0])

  def test_dependent_aggregations_cannot_run_in_mergeable_form(self):
    runtime.set_local_execution_context()
    self.assertAllClose(federated_variance(CLIENT_VALUES), 35.0 / 12.0)
    workers = self.start_workers(2)
    runtime.set_remote_execution_context([w.address for w in workers])
    with self.assertRaisesRegex(ValueError, 'one aggregate dependent on another'):
      federated_variance(CLIENT_VALUES)

  def test_killed_worker_fails_the_next_call_naming_it(self):
    workers = self.start_workers(2)
    runtime.set_remote_execution_context([w.address for w in workers], reconnect_timeout_s=2.0)
    self.assertAllClose(federated_total(CLIENT_VALUES), 21.0)
    victim = workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    self.assertTrue(_pid_gone(victim.pid, timeout_s=5))

    start = time.monotonic()
    with self.assertRaisesRegex(runtime.WorkerUnavailableError, victim.address) as raised:
      federated_total(CLIENT_VALUES)
    self.assertLess(time.monotonic() - start, 60)
    self.assertEqual(raised.exception.address, victim.address)

  def test_hung_worker_fails_within_the_rpc_deadline(self):
    workers = self.start_workers(2)
    runtime.set_remote_execution_context([w.address for w in workers], rpc_timeout_s=2.0)
    self.assertAllClose(federated_total(CLIENT_VALUES), 21.0)
    os.kill(workers[0].pid, signal.SIGSTOP)  # Alive, connected, never answers. tearDown resumes.
    start = time.monotonic()
    with self.assertRaisesRegex(runtime.WorkerUnavailableError, f'{workers[0].address}.*deadline'):
      federated_total(CLIENT_VALUES)
    self.assertLess(time.monotonic() - start, 30)

  def test_execution_context_with_local_workers(self):
    with runtime.execution_context(num_local_workers=2) as addresses:
      self.assertLen(addresses, 2)
      pids = runtime.live_worker_pids()
      self.assertLen(pids, 2)
      self.assertAllClose(sum_and_merge_count(CLIENT_VALUES), (21.0, 1))
    for pid in pids:
      self.assertTrue(_pid_gone(pid))

    with self.assertRaisesRegex(ZeroDivisionError, 'inside'):
      with runtime.execution_context(num_local_workers=2):
        pids = runtime.live_worker_pids()
        raise ZeroDivisionError('inside')
    for pid in pids:
      self.assertTrue(_pid_gone(pid))

  @parameterized.named_parameters(
    ('no_port', ['localhost:8000', 'localhost'], r'worker_addresses\[1\]'),
    ('port_zero', ['localhost:0'], r"worker_addresses\[0\].*'localhost:0'"),
    ('port_too_big', ['localhost:65536'], r"'localhost:65536'"),
    ('port_not_int', ['localhost:http'], r"'localhost:http'"),
    ('no_host', [':8000'], r"':8000'"),
    ('ipv6_without_brackets', ['::1:8000'], r"'::1:8000'"),
    ('whitespace', ['localhost: 8000'], r"'localhost: 8000'"),
    ('not_a_string', ['localhost:8000', 8000], r'worker_addresses\[1\].*8000'),
    ('single_string', 'localhost:8000', 'sequence'),
    ('empty', [], 'at least one'),
  )
  def test_bad_addresses_raise_value_error_naming_them(self, addresses, message):
    with self.assertRaisesRegex(ValueError, message):
      runtime.set_remote_execution_context(addresses)

  def test_unreachable_worker_raises_naming_it(self):
    (worker,) = self.start_workers(1)
    dead_address = f'localhost:{portpicker.pick_unused_port()}'
    start = time.monotonic()
    with self.assertRaisesRegex(runtime.WorkerUnavailableError, f'{dead_address} within 1 s'):
      runtime.set_remote_execution_context([worker.address, dead_address], connect_timeout_s=1.0)
    self.assertLess(time.monotonic() - start, 10)
    # The IPv6 bracket form is accepted (the worker listens on all interfaces).
    runtime.set_remote_execution_context([f'[::1]:{worker.port}'])
    self.assertAllClose(federated_total([1.0, 2.0]), 3.0)


if __name__ == '__main__':
  tf.test.main()
