"""End-to-end tests of `run_experiments.py` as a subprocess: exit codes, SIGKILL + resume, workers.

Each subprocess carries a unique environment marker, which its TFF workers inherit, so a test can
find the workers it caused and check that none outlives the program.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import pytest
import tensorflow as tf

from tff_clipq.experiments import outputs
from tff_clipq.experiments import program
from tff_clipq.experiments import run_dirs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = str(REPO_ROOT / 'run_experiments.py')
TIMEOUT_S = 300
TINY_FLAGS = (
  '--dataset=synthetic',
  '--model=logistic',
  '--num_clients=8',
  '--clients_per_round=3',
  '--batch_size=16',
  '--client_learning_rate=0.05',
  '--aggregator=clipq',
  '--bits=2',
)


def _process_state(pid: int) -> str:
  try:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return 'X'


def workers_with_marker(marker: str) -> list[int]:
  """PIDs of running `worker_binary` processes whose environment holds `marker`."""
  pids = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      if pathlib.Path(f'/proc/{entry}/comm').read_text().strip() != 'worker_binary':
        continue
      environ = pathlib.Path(f'/proc/{entry}/environ').read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
      continue
    if marker.encode() in environ and _process_state(int(entry)) not in ('Z', 'X'):
      pids.append(int(entry))
  return pids


def child_workers(pid: int) -> list[int]:
  """PIDs of the `worker_binary` children of process `pid`."""
  workers = []
  for task in pathlib.Path(f'/proc/{pid}/task').iterdir():
    try:
      children = (task / 'children').read_text().split()
    except (FileNotFoundError, ProcessLookupError):
      continue  # The thread exited between listing and reading.
    for child in children:
      try:
        if pathlib.Path(f'/proc/{child}/comm').read_text().strip() == 'worker_binary':
          workers.append(int(child))
      except (FileNotFoundError, ProcessLookupError):
        pass  # Exited meanwhile.
  return workers


def wait_until(condition, timeout_s: float, poll_s: float = 0.05) -> bool:
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(poll_s)
  return True


class RunExperimentsScriptTest(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    self.marker = f'TFF_CLIPQ_TEST_MARKER={uuid.uuid4().hex}'
    name, value = self.marker.split('=')
    self.env = {**os.environ, name: value}

  def tearDown(self):
    self.assertTrue(
      wait_until(lambda: not workers_with_marker(self.marker), timeout_s=10),
      f'TFF workers left running: {workers_with_marker(self.marker)}',
    )
    super().tearDown()

  def run_script(self, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      [sys.executable, SCRIPT, *args],
      cwd=REPO_ROOT,
      env=self.env,
      stdin=subprocess.DEVNULL,
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
      check=False,
    )

  def start_script(self, *args: str) -> subprocess.Popen:
    """Starts the script with its output in files (read them with `output`)."""
    log_dir = self.create_tempdir().full_path
    self.stdout_path, self.stderr_path = f'{log_dir}/stdout', f'{log_dir}/stderr'
    with open(self.stdout_path, 'w') as stdout, open(self.stderr_path, 'w') as stderr:
      process = subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        cwd=REPO_ROOT,
        env=self.env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
      )
    self.addCleanup(lambda: process.poll() is None and process.kill())
    return process

  def output(self) -> str:
    return pathlib.Path(self.stdout_path).read_text() + pathlib.Path(self.stderr_path).read_text()

  def test_invalid_flag_values_exit_with_status_2(self):
    output_dir = self.create_tempdir().full_path
    result = self.run_script('--bits=17', f'--output_dir={output_dir}')
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertRegex(result.stderr, r'error: --bits must be an integer in \[1, 16\]')
    self.assertNotIn('Traceback', result.stderr)
    self.assertEmpty(os.listdir(output_dir))

    result = self.run_script('--dataset=cifar10')
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertRegex(result.stderr, r'error: .*--dataset=cifar10.*should be one of')

  @pytest.mark.slow
  def test_sigkill_then_resume_matches_an_uninterrupted_run(self):
    rounds = 12
    flags = (*TINY_FLAGS, f'--rounds={rounds}', '--rounding=stochastic', '--payload=weights')
    output_dir = self.create_tempdir().full_path
    process = self.start_script(*flags, f'--output_dir={output_dir}')
    checkpoint_3 = run_dirs.checkpoint_path(output_dir, 3)
    self.assertTrue(
      wait_until(lambda: os.path.exists(checkpoint_3) or process.poll() is not None, TIMEOUT_S),
      'no checkpoint of round 3',
    )
    process.send_signal(signal.SIGKILL)
    process.wait(TIMEOUT_S)
    self.assertBetween(run_dirs.completed_rounds(output_dir), 3, rounds - 1, self.output())

    result = self.run_script(*flags, f'--output_dir={output_dir}', '--resume')
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn('| clipq-2b-max_abs-stochastic-example_count |', result.stdout)

    reference_dir = self.create_tempdir().full_path
    result = self.run_script(*flags, f'--output_dir={reference_dir}')
    self.assertEqual(result.returncode, 0, result.stderr)
    resumed = outputs.read_json(os.path.join(output_dir, 'summary.json'))
    reference = outputs.read_json(os.path.join(reference_dir, 'summary.json'))
    drop_time = lambda history: [
      {k: v for k, v in r.items() if k != 'round_seconds'} for r in history
    ]
    self.assertEqual(drop_time(resumed['history']), drop_time(reference['history']))
    with open(os.path.join(output_dir, program.METRICS_CSV)) as file:
      rounds_in_csv = [line.split(',')[0] for line in file.read().splitlines()[1:]]
    self.assertEqual(rounds_in_csv, [str(r) for r in range(1, rounds + 1)])

  @pytest.mark.slow
  def test_killed_worker_fails_clearly_and_resume_finishes(self):
    flags = (*TINY_FLAGS, '--rounds=20', '--num_local_workers=2')
    output_dir = self.create_tempdir().full_path
    process = self.start_script(*flags, f'--output_dir={output_dir}')
    checkpoint_2 = run_dirs.checkpoint_path(output_dir, 2)
    self.assertTrue(
      wait_until(lambda: os.path.exists(checkpoint_2) or process.poll() is not None, TIMEOUT_S),
      'no checkpoint of round 2',
    )
    workers = child_workers(process.pid)
    self.assertLen(workers, 2)
    os.kill(workers[0], signal.SIGKILL)
    self.assertEqual(process.wait(TIMEOUT_S), 1, self.output())
    stderr = pathlib.Path(self.stderr_path).read_text()
    self.assertRegex(stderr, r'error: TFF worker at localhost:\d+ failed')
    self.assertIn('--resume', stderr)
    self.assertNotIn('Traceback', stderr)

    result = self.run_script(*flags, f'--output_dir={output_dir}', '--resume')
    self.assertEqual(result.returncode, 0, result.stderr)
    summary = outputs.read_json(os.path.join(output_dir, 'summary.json'))
    self.assertEqual(summary['rounds_completed'], 20)


if __name__ == '__main__':
  tf.test.main()
