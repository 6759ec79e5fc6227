"""TFF execution contexts whose `worker_binary` processes never outlive Python.

TFF's default context starts `tensorflow_federated/data/worker_binary` with the parent's stdout and
stderr and stops it only from a `__del__`, which need not run at exit: the child can outlive Python
and keep a pipe open (`python run.py | tail` hangs). Here this package starts and owns every worker:

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

Modules:

* `workers`: starting, owning and stopping `worker_binary` processes (`start_local_workers`);
* `grpc_stub`: probing workers over gRPC, and bounded retries (`WorkerUnavailableError`);
* `contexts`: the local and remote TFF execution contexts (`set_local_execution_context`,
  `set_remote_execution_context`, `execution_context`);
* `checks`: argument checks shared by the above.
"""

from tff_clipq.runtime.contexts import execution_context
from tff_clipq.runtime.contexts import reset_execution_context
from tff_clipq.runtime.contexts import set_local_execution_context
from tff_clipq.runtime.contexts import set_remote_execution_context
from tff_clipq.runtime.grpc_stub import WorkerUnavailableError
from tff_clipq.runtime.workers import live_worker_pids
from tff_clipq.runtime.workers import start_local_workers
from tff_clipq.runtime.workers import WORKER_BINARY_PATH
from tff_clipq.runtime.workers import WorkerProcess
from tff_clipq.runtime.workers import WorkerStartError
