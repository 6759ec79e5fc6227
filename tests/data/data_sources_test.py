"""Tests for tff_clipq.data.sources: file formats, source resolution, validation, generated data."""

import gzip
import os
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from tff_clipq.data import sources

IMAGE_SHAPE = (28, 28)


def make_arrays(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Random uint8 images [N, 28, 28] and labels cycling through 0..9."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num_examples,) + IMAGE_SHAPE, dtype=np.uint8)
  labels = (np.arange(num_examples) % 10).astype(np.uint8)
  return images, labels


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
  """Encodes a uint8 array in the IDX format with the given magic number."""
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_file(path: str, content: bytes) -> str:
  """Writes `content`, gzip-compressed if `path` ends with .gz; returns `path`."""
  with gzip.open(path, 'wb') if path.endswith('.gz') else open(path, 'wb') as f:
    f.write(content)
  return path


def write_idx_split(
  directory: str,
  prefix: str,
  images: np.ndarray,
  labels: np.ndarray,
  suffix: str = '.gz',
  separator: str = '-',
) -> None:
  """Writes `{prefix}-images-idx3-ubyte{suffix}` and the matching labels file."""
  write_file(
    os.path.join(directory, f'{prefix}-images{separator}idx3-ubyte{suffix}'),
    idx_bytes(images, sources.IDX_IMAGES_MAGIC),
  )
  write_file(
    os.path.join(directory, f'{prefix}-labels{separator}idx1-ubyte{suffix}'),
    idx_bytes(labels, sources.IDX_LABELS_MAGIC),
  )


class SourcesTestCase(tf.test.TestCase):
  """Isolates source resolution: empty home, no env vars, no system dirs, no network."""

  def make_dir(self, name: str = 'dir') -> str:
    """A fresh directory, removed with the test's temporary directory."""
    return tempfile.mkdtemp(prefix=name, dir=self.get_temp_dir())

  def setUp(self):
    super().setUp()
    self.home = self.make_dir('home')
    self.train_images, self.train_labels = make_arrays(30, seed=1)
    self.test_images, self.test_labels = make_arrays(20, seed=2)
    environ = {k: v for k, v in os.environ.items() if k not in sources.ENV_VARS.values()}
    environ['HOME'] = self.home
    self.enter_context(mock.patch.dict(os.environ, environ, clear=True))
    self.enter_context(
      mock.patch.dict(
        sources.SYSTEM_DIRS,
        {name: (os.path.join(self.home, 'none'),) for name in ('mnist', 'fashion_mnist')},
      )
    )
    self.keras_load_data = {
      name: self.enter_context(
        mock.patch.object(
          getattr(tf.keras.datasets, name), 'load_data', side_effect=OSError('no network')
        )
      )
      for name in sources.ENV_VARS
    }

  def write_full_idx_dir(self, name: str = 'idx', **kwargs) -> str:
    directory = self.make_dir(name)
    write_idx_split(directory, 'train', self.train_images, self.train_labels, **kwargs)
    write_idx_split(directory, 't10k', self.test_images, self.test_labels, **kwargs)
    return directory

  def write_npz(self, path: str) -> str:
    np.savez(
      path,
      x_train=self.train_images,
      y_train=self.train_labels,
      x_test=self.test_images,
      y_test=self.test_labels,
    )
    return path

  def assert_standard_split(self, dataset: sources.ArrayDataset) -> None:
    self.assertAllEqual(dataset.train_images, self.train_images)
    self.assertAllEqual(dataset.train_labels, self.train_labels)
    self.assertAllEqual(dataset.test_images, self.test_images)
    self.assertAllEqual(dataset.test_labels, self.test_labels)
    self.assertEqual(dataset.train_images.dtype, np.uint8)
    self.assertEqual(dataset.train_labels.dtype, np.int64)
    self.assertEqual(dataset.test_labels.dtype, np.int64)
    self.assertEqual(dataset.num_classes, 10)


class FormatsTest(SourcesTestCase):
  def test_gzipped_idx_directory(self):
    directory = self.write_full_idx_dir()
    dataset = sources.load_array_dataset('mnist', data_dir=directory)
    self.assert_standard_split(dataset)
    self.assertIn(os.path.join(directory, 'train-images-idx3-ubyte.gz'), dataset.source)

  def test_raw_idx_directory(self):
    directory = self.write_full_idx_dir(suffix='')
    dataset = sources.load_array_dataset('fashion_mnist', data_dir=directory)
    self.assert_standard_split(dataset)
    self.assertIn(os.path.join(directory, 't10k-labels-idx1-ubyte'), dataset.source)

  def test_dotted_idx_file_names(self):
    directory = self.write_full_idx_dir(separator='.')
    self.assert_standard_split(sources.load_array_dataset('mnist', data_dir=directory))

  def test_npz_named_after_dataset_in_directory(self):
    directory = self.make_dir()
    path = self.write_npz(os.path.join(directory, 'fashion_mnist.npz'))
    np.savez(os.path.join(directory, 'other.npz'), unrelated=np.zeros(1))
    dataset = sources.load_array_dataset('fashion_mnist', data_dir=directory)
    self.assert_standard_split(dataset)
    self.assertEqual(dataset.source, path)

  def test_single_npz_in_directory(self):
    directory = self.make_dir()
    self.write_npz(os.path.join(directory, 'digits_copy.npz'))
    self.assert_standard_split(sources.load_array_dataset('mnist', data_dir=directory))

  def test_npz_file_as_data_dir(self):
    path = self.write_npz(os.path.join(self.make_dir(), 'mnist.npz'))
    self.assert_standard_split(sources.load_array_dataset('mnist', data_dir=path))

  def test_test_split_only_directory_is_split_and_announced(self):
    directory = self.make_dir()
    images, labels = make_arrays(50, seed=3)
    write_idx_split(directory, 't10k', images, labels)
    with self.assertLogs('absl', level='INFO') as logs:
      dataset = sources.load_array_dataset('mnist', data_dir=directory, seed=5)
    self.assertLen(dataset.train_images, 40)
    self.assertLen(dataset.test_images, 10)
    self.assertIn('test split only', dataset.source)
    self.assertIn('first 40 -> training pool, last 10 -> held-out evaluation', dataset.source)
    self.assertIn('test split only', '\n'.join(logs.output))
    # Together the two parts are exactly the original examples.
    all_images = np.concatenate([dataset.train_images, dataset.test_images])
    all_labels = np.concatenate([dataset.train_labels, dataset.test_labels])
    order = np.lexsort(all_images.reshape(50, -1).T)
    expected_order = np.lexsort(images.reshape(50, -1).T)
    self.assertAllEqual(all_images[order], images[expected_order])
    self.assertAllEqual(all_labels[order], labels[expected_order])

  def test_test_split_only_is_deterministic_given_seed(self):
    directory = self.make_dir()
    write_idx_split(directory, 't10k', *make_arrays(50, seed=3))
    first = sources.load_array_dataset('mnist', data_dir=directory, seed=5)
    again = sources.load_array_dataset('mnist', data_dir=directory, seed=5)
    other = sources.load_array_dataset('mnist', data_dir=directory, seed=6)
    self.assertAllEqual(first.train_images, again.train_images)
    self.assertAllEqual(first.test_labels, again.test_labels)
    self.assertNotAllEqual(first.train_images, other.train_images)


class ResolutionTest(SourcesTestCase):
  def test_environment_variable_is_used(self):
    directory = self.write_full_idx_dir()
    with mock.patch.dict(os.environ, {'TFF_CLIPQ_MNIST_DIR': directory}):
      dataset = sources.load_array_dataset('mnist')
    self.assert_standard_split(dataset)

  def test_data_dir_beats_environment_variable(self):
    data_dir = self.write_full_idx_dir('from_argument')
    env_dir = self.make_dir('from_env')
    write_idx_split(env_dir, 't10k', *make_arrays(50, seed=3))
    with mock.patch.dict(os.environ, {'TFF_CLIPQ_FASHION_MNIST_DIR': env_dir}):
      dataset = sources.load_array_dataset('fashion_mnist', data_dir=data_dir)
    self.assert_standard_split(dataset)
    self.assertIn(data_dir, dataset.source)

  def test_unusable_environment_variable_raises_without_fallback(self):
    self.write_npz(self.make_keras_cache_dir() + '/mnist.npz')
    missing = os.path.join(self.home, 'missing')
    with mock.patch.dict(os.environ, {'TFF_CLIPQ_MNIST_DIR': missing}):
      with self.assertRaisesRegex(
        sources.DataSourceError, f'TFF_CLIPQ_MNIST_DIR={missing!r} does not exist'
      ):
        sources.load_array_dataset('mnist')

  def test_nonexistent_data_dir_raises_naming_it(self):
    missing = os.path.join(self.home, 'no_such_dir')
    with self.assertRaisesRegex(sources.DataSourceError, f'`data_dir` {missing!r} does not exist'):
      sources.load_array_dataset('mnist', data_dir=missing)

  def test_unusable_data_dir_raises_naming_it(self):
    directory = self.make_dir()
    with self.assertRaisesRegex(
      sources.DataSourceError, f'`data_dir` {directory!r} is not a usable mnist source'
    ):
      sources.load_array_dataset('mnist', data_dir=directory)

  def make_keras_cache_dir(self) -> str:
    cache = os.path.join(self.home, '.keras', 'datasets')
    os.makedirs(cache)
    return cache

  def test_keras_cache_mnist_npz(self):
    path = self.write_npz(os.path.join(self.make_keras_cache_dir(), 'mnist.npz'))
    dataset = sources.load_array_dataset('mnist')
    self.assert_standard_split(dataset)
    self.assertEqual(dataset.source, path)

  def test_keras_cache_fashion_mnist_directory(self):
    cache = os.path.join(self.make_keras_cache_dir(), 'fashion-mnist')
    os.makedirs(cache)
    write_idx_split(cache, 'train', self.train_images, self.train_labels)
    write_idx_split(cache, 't10k', self.test_images, self.test_labels)
    dataset = sources.load_array_dataset('fashion_mnist')
    self.assert_standard_split(dataset)
    self.assertIn(cache, dataset.source)

  def test_system_directory_for_fashion_mnist(self):
    directory = self.write_full_idx_dir('usr_share')
    with mock.patch.dict(sources.SYSTEM_DIRS, {'fashion_mnist': (directory,)}):
      dataset = sources.load_array_dataset('fashion_mnist')
    self.assert_standard_split(dataset)

  def test_corrupt_keras_cache_falls_through_to_download(self):
    write_file(os.path.join(self.make_keras_cache_dir(), 'mnist.npz'), b'not a zip')
    self.keras_load_data['mnist'].side_effect = None
    self.keras_load_data['mnist'].return_value = (
      (self.train_images, self.train_labels),
      (self.test_images, self.test_labels),
    )
    dataset = sources.load_array_dataset('mnist')
    self.assert_standard_split(dataset)
    self.assertEqual(dataset.source, 'downloaded through tf.keras.datasets.mnist.load_data()')
    self.keras_load_data['mnist'].assert_called_once_with()

  def test_keras_download_is_the_last_resort(self):
    self.keras_load_data['fashion_mnist'].side_effect = None
    self.keras_load_data['fashion_mnist'].return_value = (
      (self.train_images, self.train_labels),
      (self.test_images, self.test_labels),
    )
    dataset = sources.load_array_dataset('fashion_mnist')
    self.assert_standard_split(dataset)
    self.assertEqual(
      dataset.source, 'downloaded through tf.keras.datasets.fashion_mnist.load_data()'
    )

  def test_no_source_found_lists_every_place_tried(self):
    with self.assertRaises(sources.DataSourceError) as raised:
      sources.load_array_dataset('fashion_mnist')
    message = str(raised.exception)
    for expected in (
      '`data_dir`: not given',
      'TFF_CLIPQ_FASHION_MNIST_DIR: not set',
      os.path.join(self.home, '.keras', 'datasets', 'fashion-mnist') + ': does not exist',
      os.path.join(self.home, 'none') + ': does not exist',
      'tf.keras.datasets.fashion_mnist.load_data(): OSError: no network',
      'pass --data_dir',
    ):
      self.assertIn(expected, message)


class ValidationTest(SourcesTestCase):
  """Each malformed input raises DataSourceError naming the file and the problem."""

  def assert_load_fails(self, directory: str, *expected_fragments: str) -> None:
    with self.assertRaises(sources.DataSourceError) as raised:
      sources.load_array_dataset('mnist', data_dir=directory)
    for fragment in expected_fragments:
      self.assertIn(fragment, str(raised.exception))

  def test_bad_magic_number(self):
    directory = self.write_full_idx_dir(suffix='')
    path = os.path.join(directory, 'train-labels-idx1-ubyte')
    write_file(path, idx_bytes(self.train_labels, sources.IDX_IMAGES_MAGIC))
    self.assert_load_fails(directory, path, 'bad IDX magic number 2051, expected 2049')

  def test_truncated_payload(self):
    directory = self.write_full_idx_dir()
    path = os.path.join(directory, 't10k-images-idx3-ubyte.gz')
    write_file(path, idx_bytes(self.test_images, sources.IDX_IMAGES_MAGIC)[:-100])
    self.assert_load_fails(directory, path, 'file truncated', 'shape (20, 28, 28)')

  def test_trailing_bytes(self):
    directory = self.write_full_idx_dir(suffix='')
    path = os.path.join(directory, 't10k-labels-idx1-ubyte')
    write_file(path, idx_bytes(self.test_labels, sources.IDX_LABELS_MAGIC) + b'\x00')
    self.assert_load_fails(directory, path, 'has trailing bytes')

  def test_truncated_header(self):
    directory = self.write_full_idx_dir(suffix='')
    path = os.path.join(directory, 'train-images-idx3-ubyte')
    write_file(path, idx_bytes(self.train_images, sources.IDX_IMAGES_MAGIC)[:10])
    self.assert_load_fails(directory, path, 'truncated IDX header')

  def test_wrong_image_size(self):
    directory = self.write_full_idx_dir(suffix='')
    path = os.path.join(directory, 'train-images-idx3-ubyte')
    write_file(path, idx_bytes(np.zeros((30, 8, 8), np.uint8), sources.IDX_IMAGES_MAGIC))
    self.assert_load_fails(directory, path, 'images must be 28x28. Found 8x8')

  def test_image_and_label_counts_differ(self):
    directory = self.write_full_idx_dir()
    path = os.path.join(directory, 'train-labels-idx1-ubyte.gz')
    write_file(path, idx_bytes(self.train_labels[:29], sources.IDX_LABELS_MAGIC))
    self.assert_load_fails(directory, path, 'holds 30 images but', 'holds 29 labels')

  def test_label_out_of_range(self):
    directory = self.write_full_idx_dir()
    path = os.path.join(directory, 't10k-labels-idx1-ubyte.gz')
    labels = self.test_labels.copy()
    labels[3] = 10
    write_file(path, idx_bytes(labels, sources.IDX_LABELS_MAGIC))
    self.assert_load_fails(directory, path, 'labels must lie in [0, 10). Found values in [0, 10]')

  def test_corrupt_gzip(self):
    directory = self.write_full_idx_dir()
    path = os.path.join(directory, 'train-images-idx3-ubyte.gz')
    with open(path, 'wb') as f:  # Raw bytes with a gzip magic, not a valid gzip stream.
      f.write(b'\x1f\x8b\x08\x00 definitely not deflate data')
    self.assert_load_fails(directory, path, 'cannot be read')

  def test_truncated_gzip_stream(self):
    directory = self.write_full_idx_dir()
    path = os.path.join(directory, 't10k-images-idx3-ubyte.gz')
    with open(path, 'rb') as f:
      compressed = f.read()
    with open(path, 'wb') as f:
      f.write(compressed[: len(compressed) // 2])
    self.assert_load_fails(directory, path, 'cannot be read (EOFError')

  def test_incomplete_idx_set(self):
    directory = self.write_full_idx_dir()
    os.remove(os.path.join(directory, 'train-labels-idx1-ubyte.gz'))
    self.assert_load_fails(
      directory, 'incomplete set of IDX files: missing train-labels-idx1-ubyte'
    )

  def test_corrupt_npz(self):
    directory = self.make_dir()
    path = write_file(os.path.join(directory, 'mnist.npz'), b'PK\x03\x04 truncated zip')
    self.assert_load_fails(directory, path, 'not a readable .npz archive')

  def test_npz_missing_key(self):
    directory = self.make_dir()
    path = os.path.join(directory, 'mnist.npz')
    np.savez(path, x_train=self.train_images, y_train=self.train_labels)
    self.assert_load_fails(directory, path, "missing keys ['x_test', 'y_test']")

  def test_npz_with_wrong_dtype(self):
    directory = self.make_dir()
    path = os.path.join(directory, 'mnist.npz')
    np.savez(
      path,
      x_train=self.train_images.astype(np.float32),
      y_train=self.train_labels,
      x_test=self.test_images,
      y_test=self.test_labels,
    )
    self.assert_load_fails(directory, path, 'x_train must be uint8 [N, 28, 28]. Found float32')

  def test_several_unnamed_npz_files(self):
    directory = self.make_dir()
    self.write_npz(os.path.join(directory, 'a.npz'))
    self.write_npz(os.path.join(directory, 'b.npz'))
    self.assert_load_fails(directory, 'several .npz files (a.npz, b.npz)')

  def test_unknown_dataset_name(self):
    with self.assertRaisesRegex(ValueError, "`name` must be one of .* Found 'cifar10'"):
      sources.load_array_dataset('cifar10')

  def test_data_dir_for_dataset_without_files(self):
    with self.assertRaisesRegex(ValueError, "`data_dir` is not used by the 'digits' dataset"):
      sources.load_array_dataset('digits', data_dir='/tmp')


class GeneratedDatasetsTest(tf.test.TestCase):
  def test_digits(self):
    dataset = sources.load_array_dataset('digits', seed=0)
    self.assertEqual(dataset.train_images.shape, (1438, 8, 8))
    self.assertEqual(dataset.test_images.shape, (359, 8, 8))
    self.assertEqual(dataset.train_images.dtype, np.uint8)
    self.assertEqual(dataset.train_labels.dtype, np.int64)
    self.assertEqual(dataset.train_images.max(), 255)  # 16 -> 255.
    self.assertEqual(dataset.num_classes, 10)
    self.assertIn('sklearn.datasets.load_digits', dataset.source)
    labels = np.concatenate([dataset.train_labels, dataset.test_labels])
    self.assertAllEqual(np.bincount(labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])

  def test_digits_split_depends_on_seed_only(self):
    first = sources.load_array_dataset('digits', seed=1)
    again = sources.load_array_dataset('digits', seed=1)
    other = sources.load_array_dataset('digits', seed=2)
    self.assertAllEqual(first.test_images, again.test_images)
    self.assertNotAllEqual(first.test_images, other.test_images)

  def test_synthetic_is_deterministic_and_balanced(self):
    first = sources.load_array_dataset('synthetic', seed=3)
    again = sources.load_array_dataset('synthetic', seed=3)
    other = sources.load_array_dataset('synthetic', seed=4)
    self.assertEqual(first.train_images.shape, (2000, 28, 28))
    self.assertEqual(first.test_images.shape, (500, 28, 28))
    self.assertEqual(first.train_images.dtype, np.uint8)
    self.assertAllEqual(np.bincount(first.train_labels), [200] * 10)
    self.assertAllEqual(first.train_images, again.train_images)
    self.assertAllEqual(first.test_labels, again.test_labels)
    self.assertNotAllEqual(first.train_images, other.train_images)

  def test_synthetic_is_learnable(self):
    dataset = sources.load_array_dataset('synthetic', seed=0)
    features = dataset.train_images.reshape(2000, -1).astype(np.float32)
    class_means = np.stack([features[dataset.train_labels == c].mean(0) for c in range(10)])
    test_features = dataset.test_images.reshape(500, -1).astype(np.float32)
    distances = ((test_features[:, None, :] - class_means[None]) ** 2).sum(-1)
    accuracy = np.mean(distances.argmin(1) == dataset.test_labels)
    self.assertGreater(accuracy, 0.9)
