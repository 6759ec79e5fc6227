"""Tests of `benchmarks/round_time.py`: a tiny run writes a report that parses; its pieces."""

import json
import os

import benchmark_loader
import pytest
import tensorflow as tf

measure = benchmark_loader.load('round_time_measure')
targets = benchmark_loader.load('round_time_targets')
variants = benchmark_loader.load('round_time_variants')


def _measurement(variant: str, clients_per_round: int, seconds: float, **memory_mb: float):
  """A measurement of one timed round taking `seconds` of wall and CPU time."""
  return measure.Measurement(
    variant,
    clients_per_round,
    round_s=[seconds],
    data_s=[0.0],
    cpu_s=[seconds],
    **{name: int(mb * 1024 * 1024) for name, mb in memory_mb.items()},
  )


class RoundTimeBenchmarkTest(tf.test.TestCase):
  @pytest.mark.slow
  def test_tiny_run_writes_markdown_and_json(self):
    output = os.path.join(self.get_temp_dir(), 'round_time.md')
    log_path = os.path.join(self.get_temp_dir(), 'round_time.log')
    returncode, log = benchmark_loader.run(
      'round_time',
      [
        '--dataset=synthetic',
        '--num_clients=4',
        '--examples_per_client=20',
        '--clients_per_round=2',
        '--rounds=1',
        '--variants=keras,fedavg_float,clipq_2b',
        '--worker_intra_op_threads=1',
        f'--output={output}',
      ],
      log_path,
      timeout=300,
    )
    self.assertEqual(returncode, 0, msg=log[-3000:])
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
    returncode, log = benchmark_loader.run(
      'round_time',
      [f'--retarget={os.path.splitext(output)[0]}.json', f'--output={retargeted}'],
      log_path,
      timeout=120,
    )
    self.assertEqual(returncode, 0, msg=log[-3000:])
    with open(os.path.splitext(retargeted)[0] + '.json') as f:
      again = json.load(f)
    self.assertEqual(again['results'], report['results'])
    self.assertEqual(again['targets'], report['targets'])
    with open(retargeted) as f:
      self.assertIn('| clipq_2b | d | 2 |', f.read())

  def test_memory_linearity_check(self):
    linear = [(10, 500.0), (50, 900.0), (100, 1400.0)]
    self.assertTrue(targets.memory_is_at_most_linear(linear))
    superlinear = [(10, 500.0), (50, 600.0), (100, 1400.0)]
    self.assertFalse(targets.memory_is_at_most_linear(superlinear))
    self.assertIsNone(targets.memory_is_at_most_linear(linear[:2]))

  def test_round_rise_linearity_check(self):
    self.assertTrue(targets.rise_is_at_most_linear([(10, 11.0), (50, 13.0), (100, 62.0)]))
    self.assertTrue(targets.rise_is_at_most_linear([(10, 1.0), (50, 37.0), (100, 51.0)]))
    self.assertFalse(targets.rise_is_at_most_linear([(10, 5.0), (50, 20.0), (100, 400.0)]))
    self.assertIsNone(targets.rise_is_at_most_linear([(10, 5.0)]))

  def test_targets_judge_wall_time_and_show_cpu_time(self):
    measurements = []
    for k in (10, 50, 100):
      measurements += [
        _measurement('keras', k, 1.0, rise_main_bytes=1.0),
        _measurement('fedavg_float', k, 1.2, peak_worker_bytes=100.0 + k),
        _measurement('clipq_2b', k, 1.5, peak_worker_bytes=100.0 + k, rise_main_bytes=1.0),
      ]
    measurements[-1].cpu_s = [1.2]  # clipq_2b at K=100: as much CPU as FedAvg.
    by_target = {t['target']: t for t in targets.evaluate_targets(measurements, [10, 50, 100])}
    overhead = by_target['aggregator overhead: clipq (no QAT) round / FedAvg round <= 1.05']
    self.assertFalse(overhead['met'])
    self.assertAllClose(overhead['values']['clipq_2b K=10'], 1.25)
    self.assertAllClose(overhead['cpu_values']['clipq_2b K=100'], 1.0)
    self.assertIsNone(by_target['QAT overhead on local training <= 25%']['met'])
    self.assertTrue(by_target['whole round / compute floor <= 1.5']['met'])
    memory = [t for t in by_target.values() if t['target'].startswith('memory')][0]
    self.assertTrue(memory['met'])
    self.assertEqual(memory['values']['clipq_2b worker peak'], '110 -> 150 -> 200')
    # Without ours the memory target is not measured; the others' curves are still shown.
    without_ours = [m for m in measurements if m.variant != 'clipq_2b']
    memory = targets.evaluate_targets(without_ours, [10, 50, 100])[-1]
    self.assertIsNone(memory['met'])
    self.assertIn('fedavg_float worker peak', memory['values'])
    self.assertAllClose(targets.ratio(measurements, 'fedavg_float', 'keras', 50), 1.2)
    self.assertIsNone(targets.ratio(measurements, 'clipq_4b', 'keras', 50))

  def test_variant_specs(self):
    for name in variants.ALL_VARIANTS:
      spec = variants.variant_spec(name)
      self.assertIn(spec.group, 'abcd')
    self.assertEqual(variants.variant_spec('clipq_4b_qat').bits, 4)
    self.assertTrue(variants.variant_spec('clipq_4b_qat').qat)
    self.assertFalse(variants.variant_spec('clipq_2b').qat)
    self.assertEqual(variants.variant_spec('clipq_2b_qat').qat_refresh_steps, 0)
    every_step = variants.variant_spec('clipq_2b_qat_every_step')
    self.assertEqual((every_step.bits, every_step.qat, every_step.qat_refresh_steps), (2, True, 1))
    self.assertEqual(variants.variant_spec('keras_qat_2b_every_step').qat_refresh_steps, 1)
    with self.assertRaisesRegex(ValueError, 'Unknown variant'):
      variants.variant_spec('fp16')


if __name__ == '__main__':
  tf.test.main()
