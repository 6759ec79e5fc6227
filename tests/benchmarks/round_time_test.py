"""Smoke test of `benchmarks/round_time.py`: a tiny run writes a report that parses."""

import importlib.util
import json
import os
import subprocess
import sys

import tensorflow as tf

_REPO_ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
_PATH = os.path.join(_REPO_ROOT, 'benchmarks', 'round_time.py')


def _load_benchmark():
  spec = importlib.util.spec_from_file_location('round_time_benchmark', _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while it executes.
  spec.loader.exec_module(module)
  return module


benchmark = _load_benchmark()


class RoundTimeBenchmarkTest(tf.test.TestCase):
  def test_tiny_run_writes_markdown_and_json(self):
    output = os.path.join(self.get_temp_dir(), 'round_time.md')
    command = [
      sys.executable,
      _PATH,
      '--dataset=synthetic',
      '--num_clients=4',
      '--examples_per_client=20',
      '--clients_per_round=2',
      '--rounds=1',
      '--variants=keras,fedavg_float,clipq_2b',
      '--worker_intra_op_threads=1',
      f'--output={output}',
    ]
    # Output goes to a file, not a pipe (a TFF worker could hold a pipe open).
    log_path = os.path.join(self.get_temp_dir(), 'round_time.log')
    with open(log_path, 'w') as log:
      result = subprocess.run(
        command, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=False
      )
    with open(log_path) as log:
      self.assertEqual(result.returncode, 0, msg=log.read()[-3000:])
    with open(os.path.splitext(output)[0] + '.json') as f:
      report = json.load(f)
    rows = {(row['variant'], row['clients_per_round']): row for row in report['results']}
    self.assertCountEqual(rows, [('keras', 2), ('fedavg_float', 2), ('clipq_2b', 2)])
    for row in rows.values():
      self.assertLen(row['round_s'], 1)
      self.assertGreater(row['median_s'], 0.0)
      self.assertGreater(row['peak_main_mb'], 0.0)
    self.assertAlmostEqual(rows[('keras', 2)]['ratio_to_floor'], 1.0)
    self.assertAlmostEqual(rows[('fedavg_float', 2)]['ratio_to_fedavg'], 1.0)
    self.assertGreater(rows[('fedavg_float', 2)]['peak_worker_mb'], 0.0)
    self.assertLen(report['targets'], 4)
    with open(output) as f:
      markdown = f.read()
    self.assertIn('| clipq_2b | d | 2 |', markdown)
    self.assertIn('## Targets', markdown)
    self.assertEqual(report['config']['worker_intra_op_threads'], 1)
    self.assertIn('`--worker_intra_op_threads=1`', markdown)
    self.assertFalse([name for name in os.listdir(self.get_temp_dir()) if name.startswith('.tmp_')])

    # --retarget re-evaluates the saved run without measuring: same results, same verdicts.
    retargeted = os.path.join(self.get_temp_dir(), 'retargeted.md')
    command = [
      sys.executable,
      _PATH,
      f'--retarget={os.path.splitext(output)[0]}.json',
      f'--output={retargeted}',
    ]
    with open(log_path, 'w') as log:
      result = subprocess.run(
        command, stdout=log, stderr=subprocess.STDOUT, timeout=120, check=False
      )
    with open(log_path) as log:
      self.assertEqual(result.returncode, 0, msg=log.read()[-3000:])
    with open(os.path.splitext(retargeted)[0] + '.json') as f:
      again = json.load(f)
    self.assertEqual(again['results'], report['results'])
    self.assertEqual(again['targets'], report['targets'])
    with open(retargeted) as f:
      self.assertIn('| clipq_2b | d | 2 |', f.read())

  def test_memory_linearity_check(self):
    linear = [(10, 500.0), (50, 900.0), (100, 1400.0)]
    self.assertTrue(benchmark._memory_is_at_most_linear(linear))
    superlinear = [(10, 500.0), (50, 600.0), (100, 1400.0)]
    self.assertFalse(benchmark._memory_is_at_most_linear(superlinear))
    self.assertIsNone(benchmark._memory_is_at_most_linear(linear[:2]))

  def test_round_rise_linearity_check(self):
    self.assertTrue(benchmark._rise_is_at_most_linear([(10, 11.0), (50, 13.0), (100, 62.0)]))
    self.assertTrue(benchmark._rise_is_at_most_linear([(10, 1.0), (50, 37.0), (100, 51.0)]))
    self.assertFalse(benchmark._rise_is_at_most_linear([(10, 5.0), (50, 20.0), (100, 400.0)]))
    self.assertIsNone(benchmark._rise_is_at_most_linear([(10, 5.0)]))

  def test_variant_specs(self):
    for name in benchmark.ALL_VARIANTS:
      spec = benchmark.variant_spec(name)
      self.assertIn(spec.group, 'abcd')
    self.assertEqual(benchmark.variant_spec('clipq_4b_qat').bits, 4)
    self.assertTrue(benchmark.variant_spec('clipq_4b_qat').qat)
    self.assertFalse(benchmark.variant_spec('clipq_2b').qat)
    self.assertEqual(benchmark.variant_spec('clipq_2b_qat').qat_refresh_steps, 0)
    every_step = benchmark.variant_spec('clipq_2b_qat_every_step')
    self.assertEqual((every_step.bits, every_step.qat, every_step.qat_refresh_steps), (2, True, 1))
    self.assertEqual(benchmark.variant_spec('keras_qat_2b_every_step').qat_refresh_steps, 1)
    with self.assertRaisesRegex(ValueError, 'Unknown variant'):
      benchmark.variant_spec('fp16')


if __name__ == '__main__':
  tf.test.main()
