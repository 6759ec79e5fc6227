"""The federated training program: runs, checkpoints and reports one experiment or a sweep.

`run_study(config)` runs every run of `config` (one, or one per `--sweep` entry) under one TFF
execution context (local, `--workers`, or `--num_local_workers`) and writes, per run directory:

* `config.json`: the run's settings (checked again by `--resume`);
* `metrics.csv` and `tensorboard/`: one row / step per round, released through
  `tff.program.CSVFileReleaseManager` and `tensorboard_events.TensorBoardReleaseManager`;
* `checkpoints/`: after every round, one `.npz` (`run_dirs.Checkpoints`) holding the
  learning-process state, the round number, the metrics history and, with `--error_feedback`,
  every client's residual (TFF's clients are stateless, so the program keeps them by client id);
* `summary.json`: final and best accuracy, upload cost, wall time, settings and data statistics;

and, at the top of `output_dir`, `study.json`, the comparison table (`comparison.md`,
`comparison.csv`) and the plots.

Reproducibility and resume. Everything random follows from `--seed` and the round number: the
clients of round r are drawn by `np.random.default_rng([seed, r])`, each client's shuffle is seeded
from (seed, r, position), the model initialization from the seed, and the clipq aggregator's
stochastic rounding from its state and the client's data. Local training on CPU is deterministic
(measured: bit-identical states across runs and fresh TFF workers, without
`enable_op_determinism`), so a run resumed from its checkpoint after round k ends with the same
metrics as an uninterrupted one. Metrics are released before the checkpoint is saved, and a
release for round r first drops rows >= r from the CSV, so a round re-run after a crash replaces
its row instead of duplicating it. Checkpoints, the CSV and the JSON/markdown/PNG outputs are each
written to a temporary name and renamed. TensorBoard event files are append-only: a round re-run
after a crash appears twice there, with identical values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tqdm

from tff_clipq import data as data_lib
from tff_clipq import runtime
from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import outputs
from tff_clipq.experiments import run_dirs
from tff_clipq.experiments import tensorboard_events
from tff_clipq.learning import error_feedback
from tff_clipq.learning import evaluation
from tff_clipq.learning import process as process_lib
from tff_clipq.quantization import bit_allocation

METRICS_CSV = 'metrics.csv'
TENSORBOARD_DIR = 'tensorboard'
EVAL_BATCH_SIZE = 256
# Settings of the quantizing aggregators, left out of a float32 run's summary.
FLOAT_UNUSED_FIELDS = (
  'bits',
  'clipping',
  'rounding',
  'weighting',
  'min_size_to_quantize',
  'per_channel',
  'rotation',
  'sample_fraction',
  'qat',
  'qat_threshold_refresh_steps',
)

ConfigError = config_lib.ConfigError


def sample_clients(
  client_ids: Sequence[str], clients_per_round: int, seed: int, round_num: int
) -> list[str]:
  """The clients of round `round_num`, drawn without replacement from (seed, round) alone.

  Args:
    client_ids: every client's id.
    clients_per_round: how many to draw.
    seed: the run's seed.
    round_num: the round (1-based).
  """
  rng = np.random.default_rng([seed, round_num])
  return [client_ids[i] for i in rng.choice(len(client_ids), clients_per_round, replace=False)]


def client_shuffle_seed(seed: int, round_num: int, position: int) -> int:
  """Seed of the local shuffle of the `position`-th client sampled in round `round_num`.

  Args:
    seed: the run's seed.
    round_num: the round (1-based).
    position: the client's position in the round's sample.
  """
  return int(np.random.SeedSequence([seed, round_num, position]).generate_state(1)[0])


def build_data(config: config_lib.ExperimentConfig) -> data_lib.FederatedData:
  """The run's federated data; raises ConfigError if too few clients hold examples."""
  data = data_lib.build_federated_data(
    config.dataset,
    partition=config.partition,
    num_clients=config.num_clients,
    seed=config.seed,
    data_dir=config.data_dir,
    dirichlet_alpha=config.dirichlet_alpha,
    shards_per_client=config.shards_per_client,
    size_sigma=config.size_sigma,
  )
  if len(data.train.client_ids) < config.clients_per_round:
    raise ConfigError(
      f'--clients_per_round={config.clients_per_round} exceeds the {len(data.train.client_ids)} '
      f'clients that received examples ({data.partition_description}). Lower it, or raise '
      '--num_clients (or --dirichlet_alpha / --shards_per_client / lower --size_sigma, '
      'whichever made clients empty).'
    )
  return data


def run_experiment(config: config_lib.ExperimentConfig) -> dict[str, Any]:
  """Runs one experiment (no `--sweep`) and returns its summary (see `run_study`)."""
  if config.sweep:
    raise ValueError('run_experiment runs one experiment; use run_study for a --sweep.')
  (summary,) = run_study(config)
  return summary


def run_study(config: config_lib.ExperimentConfig) -> list[dict[str, Any]]:
  """Runs each run of `config` (see the module docstring) and returns their summaries.

  Every run's output directory is checked (and `--overwrite` applied) before any training starts.

  Raises:
    ConfigError: `output_dir` already holds runs and neither `--resume` nor `--overwrite` was
      given, or `--resume` found a run made with different settings.
    data_lib.DataSourceError: The dataset cannot be loaded.
    runtime.WorkerUnavailableError: A TFF worker died or could not be reached; the completed
      rounds are checkpointed, and `--resume` continues from there.
  """
  runs = config.sweep_runs()
  run_dirs.check_output_dir(config, runs)
  # Runs with the same data settings share the data (loaded once, before any training). A data
  # error thus stops the study before anything is written or deleted.
  data_by_settings: dict[tuple[Any, ...], data_lib.FederatedData] = {}
  for _, run_config in runs:
    if run_config.data_settings not in data_by_settings:
      data = build_data(run_config)
      data_by_settings[run_config.data_settings] = data
      print(f'Data: {data.source}; {data.partition_description}.', file=sys.stderr, flush=True)
  run_dirs.prepare_output_dir(config, runs)
  summaries = []
  with runtime.execution_context(
    workers=config.workers or None,
    num_local_workers=config.num_local_workers,
    intra_op_threads=config.worker_intra_op_threads or None,
  ):
    for name, run_config in runs:
      summaries.append(_run(name, run_config, data_by_settings[run_config.data_settings]))
  outputs.write_comparison(config.output_dir, summaries)
  outputs.write_plots(config.output_dir, summaries)
  return summaries


def quantized_measurements(aggregator_measurements: Any) -> Optional[Any]:
  """clipq's measurements (the `quantized` entry) wherever TFF's wrappers nested them.

  Plain clipq reports them at the top; inside `MeanFactory` and `HadamardTransformFactory` they
  sit under `mean_value` and the rotation's key. None when no clipq aggregator reported.
  """
  if not hasattr(aggregator_measurements, 'items'):
    return None
  if 'quantized' in aggregator_measurements:
    return aggregator_measurements['quantized']
  for value in aggregator_measurements.values():
    found = quantized_measurements(value)
    if found is not None:
      return found
  return None


def _round_metrics(
  output: tff.learning.templates.LearningProcessOutput,
  method: str,
  client_upload_bits: int,
  num_coordinates: int,
  clients_per_round: int,
  budget: bool = False,
) -> dict[str, Any]:
  """Training, upload and download metrics of one round, from the process output.

  With a bit `budget`, also `width_<i>`: the mean width the round's clients chose for quantized
  tensor i.
  """
  train = output.metrics['client_work']['train']
  metrics = dict(
    train_accuracy=float(train['sparse_categorical_accuracy']),
    train_loss=float(train['loss']),
  )
  # A quantized broadcast measures what it sends; TFF's broadcast sends the float32 model.
  distributor = output.metrics.get('distributor') or {}
  if 'download_bits_per_client' in distributor:
    client_download_bits = int(distributor['download_bits_per_client'])
    metrics['broadcast_quantization_mse'] = float(distributor['broadcast_quantization_mse'])
  else:
    client_download_bits = 32 * num_coordinates
  metrics['round_download_bits'] = client_download_bits * clients_per_round
  if method == 'clipq':
    quantized = quantized_measurements(output.metrics['aggregator'])
    accepted = int(quantized['accepted_clients'])
    rejected = int(quantized['rejected_nonfinite_clients']) + int(
      quantized['rejected_malformed_clients']
    )
    # Per model coordinate: a rotation's zero padding is sent but is not the model's.
    metrics.update(
      round_upload_bits=(accepted + rejected) * client_upload_bits,
      bits_per_coordinate=client_upload_bits / num_coordinates,
      compression_ratio=32.0 * num_coordinates / client_upload_bits,
      quantization_mse=float(quantized['quantization_mse']),
      normalized_mse=float(quantized['normalized_mse']),
      clipped_fraction=float(quantized['clipped_fraction']),
      accepted_clients=accepted,
      rejected_clients=rejected,
    )
    if budget:
      widths = np.asarray(quantized['per_tensor']['bits'], np.float64)
      metrics.update((f'width_{i}', float(width)) for i, width in enumerate(widths))
  else:
    metrics.update(
      round_upload_bits=client_upload_bits * clients_per_round,
      bits_per_coordinate=client_upload_bits / num_coordinates,
      compression_ratio=32.0 * num_coordinates / client_upload_bits,
    )
  return metrics


def _data_statistics(data: data_lib.FederatedData) -> dict[str, Any]:
  sizes = np.array(list(data.client_sizes.values()))
  test_examples = int(data.test.cardinality())
  return dict(
    source=data.source,
    partition=data.partition_description,
    num_clients=len(data.train.client_ids),
    empty_clients=list(data.empty_clients),
    num_test_examples=test_examples if test_examples >= 0 else None,
    samples_per_client=dict(
      min=int(sizes.min()), max=int(sizes.max()), mean=float(sizes.mean()), std=float(sizes.std())
    ),
    client_sizes={client: int(size) for client, size in data.client_sizes.items()},
    label_histograms={
      client: row.tolist() for client, row in zip(data.train.client_ids, data.label_histograms)
    },
  )


def _summary(
  name: str,
  run_config: config_lib.ExperimentConfig,
  process_config: process_lib.ProcessConfig,
  data: data_lib.FederatedData,
  history: list[dict[str, Any]],
  client_upload_bits: int,
  num_parameters: int,
) -> dict[str, Any]:
  evaluated = [row for row in history if row.get('test_accuracy') is not None]
  best = max(evaluated, key=lambda row: row['test_accuracy'], default=None)
  last = history[-1] if history else {}
  deployed = [row for row in evaluated if row.get('quantized_test_accuracy') is not None]
  config = run_dirs.config_dict(run_config)
  if run_config.aggregator == 'float':  # Settings a float32 run never used.
    for key in FLOAT_UNUSED_FIELDS:
      config.pop(key)
  return dict(
    run=name,
    method=process_config.aggregator.label + ('-ef' if process_config.error_feedback else ''),
    rounds_completed=len(history),
    final_test_accuracy=evaluated[-1]['test_accuracy'] if evaluated else None,
    final_test_loss=evaluated[-1]['test_loss'] if evaluated else None,
    best_test_accuracy=best['test_accuracy'] if best else None,
    best_round=best['round'] if best else None,
    # The global model with its weights through the run's B-bit quantizer (None for float).
    final_quantized_test_accuracy=deployed[-1]['quantized_test_accuracy'] if deployed else None,
    final_train_accuracy=last.get('train_accuracy'),
    total_upload_bits=last.get('cumulative_upload_bits', 0),
    client_upload_bits=client_upload_bits,
    total_download_bits=last.get('cumulative_download_bits', 0),
    client_download_bits=(
      last.get('round_download_bits', 0) // run_config.clients_per_round if last else 0
    ),
    bits_per_coordinate=last.get('bits_per_coordinate'),
    compression_ratio=last.get('compression_ratio'),
    wall_seconds=sum(row['round_seconds'] for row in history),
    num_parameters=num_parameters,
    config=config,
    data=_data_statistics(data),
    versions=dict(tensorflow=tf.__version__, tensorflow_federated=tff.__version__),
    history=history,
  )


def _run(
  name: str, run_config: config_lib.ExperimentConfig, data: data_lib.FederatedData
) -> dict[str, Any]:
  """Trains one run from its latest checkpoint (if any) to `rounds`; returns its summary."""
  run_dir = run_config.output_dir
  run_dirs.remove_interrupted_writes(run_dir)
  process_config = run_config.process_config(data.input_shape, data.num_classes)
  if process_config.error_feedback:
    process = error_feedback.build_error_feedback_process(process_config)
  else:
    process = process_lib.build_learning_process(process_config)
  checkpoints = run_dirs.Checkpoints(run_dir, process.initialize())
  start_round, state, history, residuals = checkpoints.load_latest()

  tensorboard = tensorboard_events.TensorBoardReleaseManager(os.path.join(run_dir, TENSORBOARD_DIR))
  release_manager = tff.program.GroupingReleaseManager(
    [
      tff.program.CSVFileReleaseManager(
        os.path.join(run_dir, METRICS_CSV),
        save_mode=tff.program.CSVSaveMode.WRITE,
        key_fieldname='round',
      ),
      tensorboard,
    ]
  )
  evaluation_model = evaluation.build_evaluation_model(process_config)
  num_parameters = int(sum(np.prod(v.shape) for v in evaluation_model.trainable_variables))
  test_data = data.test
  if run_config.max_eval_examples:
    test_data = test_data.take(run_config.max_eval_examples)
  test_batches = data_lib.preprocess_for_evaluation(test_data, EVAL_BATCH_SIZE)
  client_upload_bits = process_lib.upload_bits_per_client(process_config)
  cumulative_bits = history[-1]['cumulative_upload_bits'] if history else 0
  cumulative_download_bits = history[-1].get('cumulative_download_bits', 0) if history else 0

  progress = tqdm.tqdm(
    total=run_config.rounds,
    initial=start_round,
    desc=name,
    unit='round',
    file=sys.stderr,
    dynamic_ncols=True,
  )
  with progress, contextlib.closing(tensorboard):
    for round_num in range(start_round + 1, run_config.rounds + 1):
      started = time.monotonic()
      client_ids = sample_clients(
        data.train.client_ids, run_config.clients_per_round, run_config.seed, round_num
      )
      client_datasets = [
        data_lib.preprocess_for_training(
          data.train.create_tf_dataset_for_client(client_id),
          run_config.batch_size,
          run_config.local_epochs,
          client_shuffle_seed(run_config.seed, round_num, position),
        )
        for position, client_id in enumerate(client_ids)
      ]
      if process_config.error_feedback:
        sent = [residuals.get(client_id) or process.zero_residual() for client_id in client_ids]
        output, kept = process.next(state, client_datasets, sent)
        residuals.update(zip(client_ids, [list(r) for r in kept]))
      else:
        output = process.next(state, client_datasets)
      state = output.state
      metrics = _round_metrics(
        output,
        run_config.aggregator,
        client_upload_bits,
        num_parameters,
        run_config.clients_per_round,
        bit_allocation.is_budget(run_config.bits),
      )
      cumulative_bits += metrics['round_upload_bits']
      metrics['cumulative_upload_bits'] = cumulative_bits
      cumulative_download_bits += metrics['round_download_bits']
      metrics['cumulative_download_bits'] = cumulative_download_bits
      if round_num % run_config.eval_every == 0 or round_num == run_config.rounds:
        test = evaluation.evaluate(process, state, evaluation_model, test_batches)
        metrics.update(test_accuracy=test['accuracy'], test_loss=test['loss'])
        if run_config.aggregator != 'float':
          deployed = evaluation.evaluate(
            process, state, evaluation_model, test_batches, deployed_by=process_config
          )
          metrics.update(
            quantized_test_accuracy=deployed['accuracy'], quantized_test_loss=deployed['loss']
          )
      metrics['round_seconds'] = time.monotonic() - started
      history.append(dict(round=round_num, **metrics))
      # Release before checkpointing: a crash in between re-runs the round and replaces its row.
      asyncio.run(release_manager.release(metrics, key=round_num))
      checkpoints.save(round_num, state, history, residuals)
      progress.set_postfix(_progress_fields(history), refresh=False)
      progress.update()

  summary = _summary(
    name, run_config, process_config, data, history, client_upload_bits, num_parameters
  )
  outputs.write_json(os.path.join(run_dir, outputs.SUMMARY_JSON), summary)
  return summary


def _progress_fields(history: list[dict[str, Any]]) -> dict[str, str]:
  accuracies = [row['test_accuracy'] for row in history if 'test_accuracy' in row]
  fields = {'bits': f'{history[-1]["cumulative_upload_bits"]:.3g}'}
  if accuracies:
    fields['acc'] = f'{accuracies[-1]:.4f}'
  return fields
