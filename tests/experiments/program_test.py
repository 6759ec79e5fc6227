"""Tests for `tff_clipq.experiments.program`: training, outputs, resume, sweeps, workers.

Runs use the synthetic dataset and small models, so each takes a few seconds.
"""

import csv
import glob
import os

from absl.testing import parameterized
import matplotlib.image
import tensorflow as tf

import learning_fixtures

from tff_clipq import runtime
from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import outputs
from tff_clipq.experiments import program
from tff_clipq.experiments import run_dirs

# Time varies between runs; everything else is reproducible.
NOT_REPRODUCIBLE = ('round_seconds',)


tiny_config = learning_fixtures.tiny_config


def reproducible(history):
  return [{k: v for k, v in row.items() if k not in NOT_REPRODUCIBLE} for row in history]


def read_csv(path):
  with open(path) as file:
    return list(csv.DictReader(file))


class ClientSamplingTest(tf.test.TestCase):
  def test_depends_only_on_seed_and_round(self):
    ids = [f'client_{i}' for i in range(20)]
    first = program.sample_clients(ids, 5, seed=3, round_num=7)
    self.assertEqual(first, program.sample_clients(ids, 5, seed=3, round_num=7))
    self.assertLen(set(first), 5)
    self.assertNotEqual(first, program.sample_clients(ids, 5, seed=3, round_num=8))
    self.assertNotEqual(first, program.sample_clients(ids, 5, seed=4, round_num=7))


class TrainingTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(payload=('update', 'weights'), model=('logistic', 'cnn'))
  def test_trains_above_chance(self, payload, model):
    config = tiny_config(self.create_tempdir().full_path, payload=payload, model=model)
    summary = program.run_experiment(config)
    self.assertEqual(summary['rounds_completed'], 3)
    self.assertGreater(summary['final_test_accuracy'], 0.5)  # 10 classes: chance is 0.1.
    self.assertGreater(summary['compression_ratio'], 7.0)

  def test_outputs_are_written_and_parse(self):
    output_dir = self.create_tempdir().full_path
    summary = program.run_experiment(tiny_config(output_dir, eval_every=2))

    rows = read_csv(os.path.join(output_dir, program.METRICS_CSV))
    self.assertEqual([int(row['round']) for row in rows], [1, 2, 3])
    self.assertEqual(rows[0]['test_accuracy'], '')  # Evaluated at rounds 2 and 3 (the last).
    for row, expected in zip(rows, summary['history']):
      self.assertAlmostEqual(float(row['train_loss']), expected['train_loss'])
      self.assertEqual(int(row['cumulative_upload_bits']), expected['cumulative_upload_bits'])

    stored = outputs.read_json(os.path.join(output_dir, outputs.SUMMARY_JSON))
    self.assertEqual(stored['final_test_accuracy'], summary['final_test_accuracy'])
    self.assertEqual(
      stored['best_test_accuracy'],
      max(r['test_accuracy'] for r in stored['history'] if 'test_accuracy' in r),
    )
    self.assertEqual(
      stored['total_upload_bits'], sum(r['round_upload_bits'] for r in stored['history'])
    )
    self.assertEqual(stored['total_upload_bits'], 3 * 3 * stored['client_upload_bits'])
    self.assertEqual(stored['config']['bits'], '4')
    self.assertEqual(stored['data']['num_clients'], 8)
    self.assertEqual(
      sum(stored['data']['client_sizes'].values()),
      sum(sum(h) for h in stored['data']['label_histograms'].values()),
    )
    self.assertIn('synthetic', stored['data']['source'])

    for name in (outputs.ACCURACY_VS_ROUND_PNG, outputs.ACCURACY_VS_BITS_PNG):
      image = matplotlib.image.imread(os.path.join(output_dir, name))
      self.assertGreater(image.shape[0], 100)
    table = read_csv(os.path.join(output_dir, outputs.TABLE_CSV))
    self.assertLen(table, 1)
    self.assertEqual(float(table[0]['final_test_accuracy']), summary['final_test_accuracy'])

    (event_file,) = glob.glob(os.path.join(output_dir, program.TENSORBOARD_DIR, 'events.out.*'))
    scalars = {}
    for event in tf.compat.v1.train.summary_iterator(event_file):
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    self.assertAlmostEqual(scalars[('test_accuracy', 3)], summary['final_test_accuracy'], places=6)
    self.assertEqual({step for tag, step in scalars if tag == 'train_loss'}, {1, 2, 3})
    self.assertEmpty([f for f in os.listdir(output_dir) if f.endswith('.tmp') or '_temp' in f])


class ResumeTest(tf.test.TestCase):
  def test_resumed_run_reproduces_the_uninterrupted_run(self):
    settings = dict(rounds=4, bits='2', rounding='stochastic', payload='weights', model='cnn')
    uninterrupted = program.run_experiment(tiny_config(self.create_tempdir().full_path, **settings))

    output_dir = self.create_tempdir().full_path
    program.run_experiment(tiny_config(output_dir, **{**settings, 'rounds': 2}))
    resumed = program.run_experiment(tiny_config(output_dir, resume=True, **settings))

    self.assertEqual(reproducible(resumed['history']), reproducible(uninterrupted['history']))
    self.assertEqual(
      [int(r['round']) for r in read_csv(os.path.join(output_dir, 'metrics.csv'))], [1, 2, 3, 4]
    )

  def test_resumed_run_with_a_bit_budget_reproduces_the_uninterrupted_run(self):
    settings = dict(rounds=3, bits='budget:1.5', payload='weights', min_size_to_quantize=10)
    uninterrupted = program.run_experiment(tiny_config(self.create_tempdir().full_path, **settings))
    output_dir = self.create_tempdir().full_path
    program.run_experiment(tiny_config(output_dir, **{**settings, 'rounds': 1}))
    resumed = program.run_experiment(tiny_config(output_dir, resume=True, **settings))
    self.assertEqual(reproducible(resumed['history']), reproducible(uninterrupted['history']))
    self.assertIn('width_0', resumed['history'][-1])

  def test_resuming_a_finished_run_trains_nothing(self):
    output_dir = self.create_tempdir().full_path
    first = program.run_experiment(tiny_config(output_dir, rounds=2))
    again = program.run_experiment(tiny_config(output_dir, rounds=2, resume=True))
    self.assertEqual(again['history'], first['history'])

  def test_existing_run_needs_resume_or_overwrite(self):
    output_dir = self.create_tempdir().full_path
    program.run_experiment(tiny_config(output_dir, rounds=1))
    with self.assertRaisesRegex(config_lib.ConfigError, '--resume.*--overwrite'):
      program.run_experiment(tiny_config(output_dir, rounds=1))
    summary = program.run_experiment(tiny_config(output_dir, rounds=1, overwrite=True))
    self.assertEqual(summary['rounds_completed'], 1)

  def test_fewer_rounds_than_completed_fails(self):
    output_dir = self.create_tempdir().full_path
    program.run_experiment(tiny_config(output_dir, rounds=2))
    self.assertEqual(run_dirs.completed_rounds(output_dir), 2)
    with self.assertRaisesRegex(config_lib.ConfigError, '--rounds=1 is below the 2 rounds'):
      program.run_experiment(tiny_config(output_dir, rounds=1, resume=True))

  def test_resume_with_other_settings_fails(self):
    output_dir = self.create_tempdir().full_path
    program.run_experiment(tiny_config(output_dir, rounds=1))
    with self.assertRaisesRegex(config_lib.ConfigError, "--bits='4' \\(now '2'\\)"):
      program.run_experiment(tiny_config(output_dir, rounds=2, bits='2', resume=True))

  def test_keeps_the_last_two_checkpoints(self):
    output_dir = self.create_tempdir().full_path
    program.run_experiment(tiny_config(output_dir, rounds=3))
    self.assertEqual(
      sorted(os.listdir(os.path.join(output_dir, run_dirs.CHECKPOINT_DIR))),
      [os.path.basename(run_dirs.checkpoint_path(output_dir, r)) for r in (2, 3)],
    )

  def test_resume_removes_an_interrupted_checkpoint_write(self):
    output_dir = self.create_tempdir().full_path
    program.run_experiment(tiny_config(output_dir, rounds=1))
    leftover = os.path.join(output_dir, run_dirs.CHECKPOINT_DIR, '.round_000002.npz.x1y2.tmp')
    with open(leftover, 'wb') as file:
      file.write(b'PK\x03')
    summary = program.run_experiment(tiny_config(output_dir, rounds=2, resume=True))
    self.assertEqual(summary['rounds_completed'], 2)
    self.assertFalse(os.path.exists(leftover))

  def test_resume_rejects_checkpoints_of_the_savedmodel_format(self):
    output_dir = self.create_tempdir().full_path
    program.run_experiment(tiny_config(output_dir, rounds=1))
    os.makedirs(os.path.join(output_dir, run_dirs.CHECKPOINT_DIR, 'program_state_1'))
    with self.assertRaisesRegex(config_lib.ConfigError, 'SavedModel format.*--overwrite'):
      program.run_experiment(tiny_config(output_dir, rounds=2, resume=True))

  def test_refuses_to_delete_a_directory_it_did_not_write(self):
    output_dir = self.create_tempdir()
    output_dir.create_file('thesis.tex')
    with self.assertRaisesRegex(config_lib.ConfigError, 'not written by this program'):
      program.run_experiment(tiny_config(output_dir.full_path, overwrite=True))
    self.assertTrue(os.path.exists(os.path.join(output_dir.full_path, 'thesis.tex')))


class SweepTest(tf.test.TestCase):
  def test_sweep_compares_methods_on_the_same_clients(self):
    output_dir = self.create_tempdir().full_path
    config = tiny_config(
      output_dir,
      rounds=2,
      qat=False,
      sweep=(
        'aggregator=float; aggregator=clipq,bits=2,rounding=nearest; aggregator=tff_encoded,bits=2'
      ),
    )
    summaries = program.run_study(config)

    self.assertEqual(
      [s['method'] for s in summaries],
      ['float32', 'clipq-2b-max_abs-nearest-example_count', 'tff_encoded-2b'],
    )
    # Round 1 trains the same initial model on the same clients with the same shuffles (no QAT, so
    # the forward passes agree): every method reports the same training loss.
    first_round_losses = {s['history'][0]['train_loss'] for s in summaries}
    self.assertLen(first_round_losses, 1)
    for summary in summaries:
      self.assertTrue(
        os.path.exists(os.path.join(output_dir, summary['run'], outputs.SUMMARY_JSON))
      )
    self.assertGreater(summaries[1]['compression_ratio'], 10)
    self.assertLess(summaries[1]['total_upload_bits'], summaries[0]['total_upload_bits'] / 10)
    # A float32 run's summary keeps no quantizer settings; quantizing runs report the accuracy
    # of their quantized global model.
    self.assertNotIn('bits', summaries[0]['config'])
    self.assertIsNone(summaries[0]['final_quantized_test_accuracy'])
    self.assertEqual(summaries[1]['config']['bits'], '2')
    for summary in summaries[1:]:
      self.assertBetween(summary['final_quantized_test_accuracy'], 0.0, 1.0)

    table = read_csv(os.path.join(output_dir, outputs.TABLE_CSV))
    self.assertEqual([row['run'] for row in table], [s['run'] for s in summaries])
    with open(os.path.join(output_dir, outputs.TABLE_MARKDOWN)) as file:
      markdown = file.read()
    self.assertEqual(markdown, outputs.markdown_table(summaries))
    self.assertLen(markdown.strip().splitlines(), 2 + 3)
    self.assertIn('| aggregator-float | float32 |', markdown)
    for name in (outputs.ACCURACY_VS_ROUND_PNG, outputs.ACCURACY_VS_BITS_PNG):
      self.assertTrue(os.path.exists(os.path.join(output_dir, name)))


class LocalWorkersTest(tf.test.TestCase):
  def test_two_local_workers_reproduce_the_local_run(self):
    settings = dict(rounds=2, bits='2', rounding='nearest')
    local = program.run_experiment(tiny_config(self.create_tempdir().full_path, **settings))
    remote = program.run_experiment(
      tiny_config(self.create_tempdir().full_path, num_local_workers=2, **settings)
    )
    # The clients are split across the workers, so float sums are added in another order:
    # equal up to rounding error.
    for local_row, remote_row in zip(local['history'], remote['history']):
      for key in ('round_upload_bits', 'accepted_clients', 'rejected_clients'):
        self.assertEqual(local_row[key], remote_row[key])
      for key in ('train_loss', 'test_loss', 'test_accuracy', 'normalized_mse'):
        self.assertAllClose(local_row[key], remote_row[key], rtol=5e-3, atol=1e-3)

  def test_runs_on_workers_given_by_address(self):
    workers = runtime.start_local_workers(2)
    for worker in workers:
      self.addCleanup(worker.stop)
    summary = program.run_experiment(
      tiny_config(self.create_tempdir().full_path, rounds=1, workers=[w.address for w in workers])
    )
    self.assertEqual(summary['history'][0]['accepted_clients'], 3)
    self.assertTrue(all(worker.is_running() for worker in workers))  # Not owned by the run.


if __name__ == '__main__':
  tf.test.main()
