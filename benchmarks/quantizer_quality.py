r"""Quantizer quality: NMSE by bits per clipping method; encode/decode cost vs TFF's built-in.

For bits 1..8 and each data tensor the benchmark reports NMSE = MSE / mean(x^2) of:

* ours, OCTAV thresholds matched to the quantizer and rounding mode, refined on the exact MSE
  (`optimal_clipping_threshold`), with nearest and with stochastic rounding;
* the paper's noise model (c = 4^-B / 3, no refinement: `clipping='octav_paper'`), both roundings;
* no clipping (`max_abs`), both roundings;
* TFF's built-in quantization as `tff.aggregators.EncodedSumFactory.quantize_above_threshold` uses
  it: `tensor_encoding.encoders.uniform_quantization(bits)` (flatten -> min-max uniform
  quantization -> bit packing), run through its encode/decode; also with `stochastic=False`.

Rows of our quantizer with stochastic rounding report the exact expected MSE
(`expected_quantization_mse`); TFF rows report the measured MSE of the real encoder, averaged over
`--tff_repeats` runs. Data: Gaussian, Laplace and Student-t(3) samples, and two weight tensors of
the paper's MNIST CNN after one short epoch of plain Keras training (dense1 and conv2 kernels).

It also times encode + decode per million coordinates, each inside `tf.function`s, after warm-up,
median of `--timing_repeats` runs: ours = threshold + quantize + pack + unpack + dequantize, TFF =
`SimpleEncoder(uniform_quantization(bits)).encode` + `.decode`, at 2 and 4 bits.

Usage:
  python benchmarks/quantizer_quality.py [--output benchmarks/results/quantizer_quality.md] \
      [--num_samples 262144]

The markdown table and a JSON file with the same stem are written atomically (temporary file in
the same directory, then `os.replace`). MNIST comes from the runner's source chain (`--mnist_dir`,
$TFF_CLIPQ_MNIST_DIR, the Keras cache, ...); if none has it, scikit-learn's 8x8 `load_digits`
stands in (and the report says so).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TensorFlow is imported.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.internal import tensor_encoding as te

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # Run as a script from anywhere, without installing the package.
  sys.path.insert(0, _REPO_ROOT)

from tff_clipq import quantization  # pylint: disable=g-import-not-at-top
from tff_clipq.data import sources  # pylint: disable=g-import-not-at-top
from tff_clipq.learning import models  # pylint: disable=g-import-not-at-top
from tff_clipq.experiments import outputs  # pylint: disable=g-import-not-at-top

_OUTPUT = flags.DEFINE_string(
  'output',
  os.path.join(_REPO_ROOT, 'benchmarks', 'results', 'quantizer_quality.md'),
  'Markdown report path; a .json with the same stem is written beside it.',
)
_NUM_SAMPLES = flags.DEFINE_integer(
  'num_samples', 2**18, 'Samples per synthetic distribution.', lower_bound=16
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for data, training and stochastic rounding.')
_MNIST_DIR = flags.DEFINE_string(
  'mnist_dir', None, 'Directory with MNIST IDX .gz files (default: $TFF_CLIPQ_MNIST_DIR).'
)
_TRAIN_EXAMPLES = flags.DEFINE_integer(
  'train_examples',
  60000,
  'Training examples for the one CNN epoch (at most the data set).',
  lower_bound=1,
)
_TFF_REPEATS = flags.DEFINE_integer(
  'tff_repeats', 3, 'Runs of the (stochastic) TFF encoder averaged per entry.', lower_bound=1
)
_TIMING_COORDINATES = flags.DEFINE_integer(
  'timing_coordinates', 1_000_000, 'Size of the tensor used for timing.', lower_bound=1
)
_TIMING_REPEATS = flags.DEFINE_integer(
  'timing_repeats',
  9,
  'Timed runs per entry (after 2 warm-up runs); the median is reported.',
  lower_bound=1,
)

BITS = tuple(range(1, 9))
TIMING_BITS = (2, 4)
TFF_TIMING_VARIANT = 'TFF uniform_quantization (stochastic)'


# ------------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class DataTensor:
  name: str
  description: str
  values: np.ndarray  # float32, original shape.


def synthetic_tensors(num_samples: int, seed: int) -> list[DataTensor]:
  rng = np.random.default_rng(seed)
  return [
    DataTensor('gaussian', 'N(0, 1)', rng.standard_normal(num_samples).astype(np.float32)),
    DataTensor('laplace', 'Laplace(0, 1)', rng.laplace(size=num_samples).astype(np.float32)),
    DataTensor(
      'student_t3', 'Student-t, 3 d.o.f.', rng.standard_t(3, num_samples).astype(np.float32)
    ),
  ]


def load_training_images(data_dir: Optional[str]) -> tuple[np.ndarray, np.ndarray, str]:
  """(images [n, h, w, 1] in [0, 1], labels [n], description): MNIST, else sklearn digits.

  MNIST is looked up by the runner's source chain (`tff_clipq.data.sources`: `data_dir`,
  $TFF_CLIPQ_MNIST_DIR, the Keras cache, local installs, a download); if none has it, the
  bundled 8x8 digits stand in.
  """
  try:
    dataset = sources.load_array_dataset('mnist', data_dir)
  except sources.DataSourceError as error:
    dataset = sources.load_array_dataset('digits')
    dataset = dataclasses.replace(dataset, source=f'{dataset.source} (no MNIST: {error})')
  images = dataset.train_images.astype(np.float32) / 255.0
  return images[..., None], dataset.train_labels, dataset.source


def trained_cnn_tensors(
  mnist_dir: Optional[str], train_examples: int, seed: int
) -> tuple[list[DataTensor], dict[str, object]]:
  """Kernels of dense1 and conv2 after one epoch of SGD on (a prefix of) the training images."""
  images, labels, source = load_training_images(mnist_dir)
  images, labels = images[:train_examples], labels[:train_examples]
  tf.keras.utils.set_random_seed(seed)
  model = models.create_keras_model('cnn', images.shape[1:], 10, seed=seed)
  model.compile(
    optimizer=tf.keras.optimizers.SGD(learning_rate=0.05),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=['accuracy'],
  )
  start = time.perf_counter()
  history = model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
  info = {
    'source': source,
    'train_examples': int(images.shape[0]),
    'train_seconds': time.perf_counter() - start,
    'train_accuracy': float(history.history['accuracy'][-1]),
  }
  tensors = []
  for layer_name in ('dense1', 'conv2'):
    kernel = model.get_layer(layer_name).kernel.numpy().astype(np.float32)
    tensors.append(
      DataTensor(f'cnn_{layer_name}', f'trained CNN {layer_name} kernel {kernel.shape}', kernel)
    )
  return tensors, info


# ------------------------------------------------------------------------------------------------
# Methods. Each maps (x, bits) to the MSE of quantizing x with `bits` bits.


def ours_mse(clipping: str, rounding: str) -> Callable[[np.ndarray, int], float]:
  """Exact MSE (expected over the rounding noise, if stochastic) of our quantizer."""

  def mse(x: np.ndarray, bits: int) -> float:
    threshold = quantization.clipping_threshold(x, bits, clipping, rounding)
    return float(quantization.expected_quantization_mse(x, threshold, bits, rounding))

  return mse


def tff_encode_decode(x: tf.Tensor, bits: int, stochastic: bool) -> tf.Tensor:
  """TFF's `uniform_quantization(bits)` encoder (as in `quantize_above_threshold`), eagerly."""
  encoder = te.encoders.uniform_quantization(bits, stochastic=stochastic)
  encode_params, decode_params = encoder.get_params(encoder.initial_state())
  encoded, _, input_shapes = encoder.encode(x, encode_params)
  return encoder.decode(encoded, decode_params, input_shapes)


def tff_mse(stochastic: bool, repeats: int) -> Callable[[np.ndarray, int], float]:
  """Measured MSE of TFF's encoder, averaged over `repeats` runs when stochastic."""

  def mse(x: np.ndarray, bits: int) -> float:
    values = tf.constant(x)
    runs = repeats if stochastic else 1
    errors = [
      float(tf.reduce_mean(tf.square(tff_encode_decode(values, bits, stochastic) - values)))
      for _ in range(runs)
    ]
    return float(np.mean(errors))

  return mse


def methods(tff_repeats: int) -> dict[str, Callable[[np.ndarray, int], float]]:
  return collections.OrderedDict(
    [
      ('ours: octav, nearest', ours_mse('octav', 'nearest')),
      ('ours: octav, stochastic (expected)', ours_mse('octav', 'stochastic')),
      ('paper noise model, nearest', ours_mse('octav_paper', 'nearest')),
      ('paper noise model, stochastic (expected)', ours_mse('octav_paper', 'stochastic')),
      ('max_abs, nearest', ours_mse('max_abs', 'nearest')),
      ('max_abs, stochastic (expected)', ours_mse('max_abs', 'stochastic')),
      (
        f'TFF uniform_quantization, stochastic (mean of {tff_repeats})',
        tff_mse(True, tff_repeats),
      ),
      ('TFF uniform_quantization, stochastic=False', tff_mse(False, 1)),
    ]
  )


def nmse_table(
  tensors: list[DataTensor], method_fns: dict[str, Callable[[np.ndarray, int], float]]
) -> dict[str, dict[str, dict[int, float]]]:
  """{tensor name: {method: {bits: NMSE}}}."""
  table = {}
  for tensor in tensors:
    flat = tensor.values.reshape(-1)
    mean_square = float(np.mean(np.square(flat.astype(np.float64))))
    table[tensor.name] = {
      name: {bits: fn(flat, bits) / mean_square for bits in BITS} for name, fn in method_fns.items()
    }
  return table


# ------------------------------------------------------------------------------------------------
# Timing.


def ours_encode_decode_fn(
  num_coordinates: int, bits: int, clipping: str, rounding: str
) -> Callable[[tf.Tensor], tf.Tensor]:
  """threshold + quantize + pack + unpack + dequantize, as one tf.function."""

  @tf.function(input_signature=[tf.TensorSpec([num_coordinates], tf.float32)])
  def encode_decode(x: tf.Tensor) -> tf.Tensor:
    threshold = quantization.clipping_threshold(x, bits, clipping, rounding)
    quantized = quantization.quantize(x, bits, threshold, rounding)
    words = quantization.pack_codes(quantized.codes, bits)
    codes = quantization.unpack_codes(words, bits, num_coordinates)
    return quantization.dequantize_codes(codes, threshold, bits, tf.float32)

  return encode_decode


def tff_encode_decode_fn(num_coordinates: int, bits: int) -> Callable[[tf.Tensor], tf.Tensor]:
  """TFF's encoder through `SimpleEncoder` (its encode and decode are tf.functions)."""
  encoder = te.core.SimpleEncoder(
    te.encoders.uniform_quantization(bits), tf.TensorSpec([num_coordinates], tf.float32)
  )

  def encode_decode(x: tf.Tensor) -> tf.Tensor:
    encoded, _ = encoder.encode(x)
    return encoder.decode(encoded)

  return encode_decode


def median_milliseconds(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, repeats: int) -> float:
  for _ in range(2):  # Warm-up: tracing, graph optimization, allocator.
    fn(x).numpy()
  durations = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(x).numpy()
    durations.append(time.perf_counter() - start)
  return 1e3 * statistics.median(durations)


def timing_table(num_coordinates: int, repeats: int, seed: int) -> dict[str, dict[int, float]]:
  """{variant: {bits: ms per million coordinates}}."""
  x = tf.constant(np.random.default_rng(seed).standard_normal(num_coordinates), tf.float32)
  per_million = 1e6 / num_coordinates

  def ours(clipping: str, rounding: str) -> Callable[[int], Callable[[tf.Tensor], tf.Tensor]]:
    return lambda bits: ours_encode_decode_fn(num_coordinates, bits, clipping, rounding)

  variants = collections.OrderedDict(
    [
      ('ours: octav, stochastic', ours('octav', 'stochastic')),
      ('ours: octav, nearest', ours('octav', 'nearest')),
      ('ours: max_abs, stochastic', ours('max_abs', 'stochastic')),
      (TFF_TIMING_VARIANT, lambda bits: tff_encode_decode_fn(num_coordinates, bits)),
    ]
  )
  return {
    name: {bits: per_million * median_milliseconds(make(bits), x, repeats) for bits in TIMING_BITS}
    for name, make in variants.items()
  }


# ------------------------------------------------------------------------------------------------
# Report.


def _format_nmse(value: float) -> str:
  return f'{value:.3g}'


def markdown_report(
  tensors: list[DataTensor],
  nmse: dict[str, dict[str, dict[int, float]]],
  timing: dict[str, dict[int, float]],
  config: dict[str, object],
) -> str:
  lines = [
    '# Quantizer quality',
    '',
    'NMSE = MSE / mean(x^2) of B-bit quantize + dequantize, per tensor (lower is better).',
    '',
    '* ours: symmetric clipped quantizer, 2^B levels on [-s, s], step 2s/(2^B - 1); s from '
    '`clipping_threshold` (octav: matched noise model + exact-MSE refinement; paper noise '
    'model: c = 4^-B/3, no refinement; max_abs: s = max|x|). '
    'Stochastic rows: exact expected MSE.',
    '* TFF: `tensor_encoding.encoders.uniform_quantization(bits)` as used by '
    '`tff.aggregators.EncodedSumFactory.quantize_above_threshold`: 2^B levels on '
    '[min(x), max(x)], step (max - min)/(2^B - 1), stochastic rounding by default, codes '
    'bit-packed into 28 of 32 bits per int32 word (plus min and max as floats). '
    'Measured MSE of the real encoder.',
    '',
    f'Synthetic samples: {config["num_samples"]} per distribution, seed {config["seed"]}. '
    f'CNN: {config["cnn"]["source"]}; one epoch of SGD (lr 0.05, batch 32) over '
    f'{config["cnn"]["train_examples"]} examples in {config["cnn"]["train_seconds"]:.1f} s, '
    f'training accuracy {config["cnn"]["train_accuracy"]:.3f}.',
    '',
  ]
  for tensor in tensors:
    lines += [
      f'## {tensor.name}: {tensor.description}, {tensor.values.size} values',
      '',
      '| method | ' + ' | '.join(f'B={bits}' for bits in BITS) + ' |',
      '|---|' + '---:|' * len(BITS),
    ]
    for method, by_bits in nmse[tensor.name].items():
      lines.append(
        f'| {method} | ' + ' | '.join(_format_nmse(by_bits[bits]) for bits in BITS) + ' |'
      )
    lines.append('')
  lines += [
    f'## Encode + decode cost (ms per million coordinates; {config["timing_coordinates"]} '
    f'float32 N(0,1) coordinates, median of {config["timing_repeats"]} runs after warm-up, '
    f'{config["cpu_count"]} CPU cores)',
    '',
    'ours = threshold + quantize + pack + unpack + dequantize in one tf.function; '
    'TFF = SimpleEncoder(uniform_quantization(B)).encode + .decode.',
    '',
    '| variant | ' + ' | '.join(f'B={bits} ms | ratio to TFF' for bits in TIMING_BITS) + ' |',
    '|---|' + '---:|---:|' * len(TIMING_BITS),
  ]
  for variant, by_bits in timing.items():
    cells = [
      f'{by_bits[bits]:.1f} | {by_bits[bits] / timing[TFF_TIMING_VARIANT][bits]:.2f}x'
      for bits in TIMING_BITS
    ]
    lines.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
  lines += ['', f'Total runtime: {config["runtime_seconds"]:.1f} s.', '']
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # TFF's bit packing warns about temporary memory on every trace; the numbers are what matter.
  logging.set_verbosity(logging.ERROR)
  tf.get_logger().setLevel('ERROR')
  start = time.perf_counter()
  seed = _SEED.value
  tensors = synthetic_tensors(_NUM_SAMPLES.value, seed)
  cnn_tensors, cnn_info = trained_cnn_tensors(_MNIST_DIR.value, _TRAIN_EXAMPLES.value, seed)
  tensors += cnn_tensors
  tf.random.set_seed(seed)  # TFF's encoder and unseeded stochastic rounding use the global seed.
  nmse = nmse_table(tensors, methods(_TFF_REPEATS.value))
  timing = timing_table(_TIMING_COORDINATES.value, _TIMING_REPEATS.value, seed)
  config = {
    'num_samples': _NUM_SAMPLES.value,
    'seed': seed,
    'tff_repeats': _TFF_REPEATS.value,
    'timing_coordinates': _TIMING_COORDINATES.value,
    'timing_repeats': _TIMING_REPEATS.value,
    'cpu_count': os.cpu_count(),
    'tensorflow': tf.__version__,
    'cnn': cnn_info,
    'runtime_seconds': time.perf_counter() - start,
  }
  report = markdown_report(tensors, nmse, timing, config)
  print(report)
  output = _OUTPUT.value
  outputs.write_text(output, report)
  results = {
    'config': config,
    'tensors': {
      t.name: {'description': t.description, 'shape': list(t.values.shape)} for t in tensors
    },
    'nmse': nmse,
    'encode_decode_ms_per_million': timing,
  }
  outputs.write_text(os.path.splitext(output)[0] + '.json', json.dumps(results, indent=2) + '\n')
  print(f'Wrote {output} and {os.path.splitext(output)[0]}.json')


if __name__ == '__main__':
  app.run(main)
