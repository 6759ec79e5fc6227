"""Tests for tff_clipq.data.federated: ClientData, empty clients, EMNIST mapping, tf.data."""

import collections
import os
import re
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq import data
from tff_clipq.data import federated
from tff_clipq.data import sources

EXPECTED_ELEMENT_SPEC = collections.OrderedDict(
  x=tf.TensorSpec([4, 3, 1], tf.float32), y=tf.TensorSpec([], tf.int32)
)


def small_arrays() -> data.ArrayDataset:
  """12 train / 5 test distinct 4x3 uint8 images; labels 0..2."""
  rng = np.random.default_rng(0)
  return data.ArrayDataset(
    name='tiny',
    train_images=rng.integers(0, 256, size=(12, 4, 3), dtype=np.uint8),
    train_labels=np.arange(12, dtype=np.int64) % 3,
    test_images=rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8),
    test_labels=np.array([2, 1, 0, 1, 2], dtype=np.int64),
    num_classes=3,
    source='generated in the test',
  )


# Client 1 is empty.
CLIENT_INDICES = [
  np.array([0, 5, 7]),
  np.array([], np.int64),
  np.array([1, 2, 3, 4, 6, 8, 9, 10, 11]),
]


class FederatedDataFromArraysTest(tf.test.TestCase):
  def setUp(self):
    super().setUp()
    self.arrays = small_arrays()
    self.federated_data = data.federated_data_from_arrays(self.arrays, CLIENT_INDICES, 'manual')

  def test_client_elements_match_arrays(self):
    train = self.federated_data.train
    self.assertEqual(train.element_type_structure, EXPECTED_ELEMENT_SPEC)
    elements = list(train.create_tf_dataset_for_client('client_000').as_numpy_iterator())
    self.assertLen(elements, 3)
    for element, index in zip(elements, CLIENT_INDICES[0]):
      self.assertEqual(element['x'].dtype, np.float32)
      self.assertAllClose(element['x'][..., 0], self.arrays.train_images[index] / 255.0)
      self.assertEqual(element['y'], self.arrays.train_labels[index])

  def test_test_dataset_is_unbatched_and_complete(self):
    test = self.federated_data.test
    self.assertEqual(test.element_spec, EXPECTED_ELEMENT_SPEC)
    elements = list(test.as_numpy_iterator())
    images = np.stack([element['x'][..., 0] for element in elements])
    self.assertAllClose(images, self.arrays.test_images / 255.0)
    self.assertAllEqual([e['y'] for e in elements], self.arrays.test_labels)

  def test_empty_clients_are_reported_and_left_out(self):
    with self.assertLogs('absl', level='WARNING') as logs:
      federated_data = data.federated_data_from_arrays(self.arrays, CLIENT_INDICES, 'manual')
    self.assertIn('1 of 3 clients received no example', '\n'.join(logs.output))
    self.assertEqual(federated_data.empty_clients, [1])
    self.assertEqual(federated_data.train.client_ids, ['client_000', 'client_002'])
    self.assertEqual(federated_data.client_sizes, {'client_000': 3, 'client_002': 9})
    self.assertIn('1 empty clients left out', federated_data.partition_description)

  def test_metadata(self):
    self.assertEqual(self.federated_data.input_shape, (4, 3, 1))
    self.assertEqual(self.federated_data.num_classes, 3)
    self.assertEqual(self.federated_data.source, 'generated in the test')
    # Rows follow train.client_ids: client_000 holds labels 0, 2, 1; client_002 the rest.
    self.assertAllEqual(self.federated_data.label_histograms, [[1, 1, 1], [3, 3, 3]])

  def test_traced_dataset_fn_matches_eager(self):
    dataset_fn = self.federated_data.train.serializable_dataset_fn
    traced = tf.function(dataset_fn)(tf.constant('client_002'))
    eager = dataset_fn('client_002')
    for traced_element, eager_element in zip(traced, eager, strict=True):
      self.assertAllEqual(traced_element['x'], eager_element['x'])
      self.assertAllEqual(traced_element['y'], eager_element['y'])

  def test_dataset_fn_is_traceable_by_tff(self):
    computation = tff.tensorflow.computation(
      self.federated_data.train.serializable_dataset_fn, np.str_
    )
    self.assertEqual(str(computation.type_signature), '(str -> <x=float32[4,3,1],y=int32>*)')

  def test_client_ids_are_zero_padded_to_the_number_of_clients(self):
    indices = [np.array([i]) for i in range(12)]
    federated_data = data.federated_data_from_arrays(self.arrays, indices, 'one each')
    self.assertEqual(federated_data.train.client_ids[0], 'client_000')
    self.assertEqual(federated_data.train.client_ids[-1], 'client_011')


def rss_bytes() -> int:
  """The resident set size of this process (Linux)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) * 1024
  raise OSError('VmRSS not found in /proc/self/status.')


def map_function_names(dataset: tf.data.Dataset) -> set[str]:
  """Names of the functions in `dataset`'s serialized graph."""
  graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
  return {function.signature.name for function in graph.library.function}


class SharedMapFunctionTest(tf.test.TestCase):
  """Client datasets built afresh every round must not grow the process (the eager kernel cache)."""

  def setUp(self):
    super().setUp()
    self.arrays = small_arrays()
    self.train = data.federated_data_from_arrays(self.arrays, CLIENT_INDICES, 'manual').train

  def training_dataset(self, round_num: int) -> tf.data.Dataset:
    client_id = self.train.client_ids[round_num % 2]
    dataset = self.train.create_tf_dataset_for_client(client_id)
    return federated.preprocess_for_training(dataset, 2, 1, seed=round_num)

  def test_client_datasets_share_one_map_function(self):
    names = set()
    for round_num in range(5):
      names |= map_function_names(self.training_dataset(round_num))
    self.assertLen(names, 1)

  def test_building_datasets_afresh_does_not_grow_memory(self):
    # Each fresh `Dataset.map` left a ~70 KB kernel in the eager kernel cache: +20 MB here.
    for round_num in range(50):
      self.training_dataset(round_num)
    before = rss_bytes()
    for round_num in range(300):
      self.training_dataset(round_num)
    self.assertLess(rss_bytes() - before, 5 * 1024 * 1024)

  def test_same_pipeline_and_elements_as_dataset_map(self):
    images, labels = self.arrays.train_images, self.arrays.train_labels.astype(np.int32)
    shared = federated.map_with_shared_function(
      tf.data.Dataset.from_tensor_slices((images, labels)), federated._to_model_input
    )
    mapped = tf.data.Dataset.from_tensor_slices((images, labels)).map(federated._to_model_input)
    self.assertEqual(shared.element_spec, mapped.element_spec)
    self.assertEqual(shared.cardinality(), mapped.cardinality())
    for shared_element, mapped_element in zip(shared, mapped, strict=True):
      self.assertAllEqual(shared_element['x'], mapped_element['x'])
      self.assertAllEqual(shared_element['y'], mapped_element['y'])

    def graph_text(dataset: tf.data.Dataset) -> str:
      graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
      text = str(graph)
      for name in map_function_names(dataset):
        text = text.replace(name, 'map_function')
      return re.sub(r'Dataset:\d+', 'Dataset', text)  # Generated dataset names.

    self.assertEqual(graph_text(shared), graph_text(mapped))

  def test_seeded_training_order_is_unchanged(self):
    train_images = self.arrays.train_images[CLIENT_INDICES[2]]
    train_labels = self.arrays.train_labels[CLIENT_INDICES[2]].astype(np.int32)
    mapped = tf.data.Dataset.from_tensor_slices((train_images, train_labels)).map(
      federated._to_model_input
    )
    expected = federated.preprocess_for_training(mapped, 4, 2, seed=7)
    client = federated.preprocess_for_training(
      self.train.create_tf_dataset_for_client('client_002'), 4, 2, seed=7
    )
    for client_batch, expected_batch in zip(client, expected, strict=True):
      self.assertAllEqual(client_batch['x'], expected_batch['x'])
      self.assertAllEqual(client_batch['y'], expected_batch['y'])

  def test_graph_mode_traces_a_plain_map(self):
    @tf.function
    def first_label(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
      dataset = tf.data.Dataset.from_tensor_slices((images, labels))
      mapped = federated.map_with_shared_function(dataset, federated._to_model_input)
      return next(iter(mapped))['y']

    self.assertEqual(
      first_label(self.arrays.train_images, self.arrays.train_labels.astype(np.int32)), 0
    )


class BuildFederatedDataTest(tf.test.TestCase):
  def test_synthetic_partitions(self):
    for partition, description in (
      ('iid', 'iid: 8 clients, balanced, seed 1'),
      ('dirichlet', 'dirichlet: per-class client proportions ~ Dirichlet(0.3)'),
      ('shards', 'shards: 8 clients x 2 label-sorted shards of ~125 examples'),
    ):
      with self.subTest(partition=partition):
        federated_data = data.build_federated_data('synthetic', partition, num_clients=8, seed=1)
        self.assertIn(description, federated_data.partition_description)
        self.assertEqual(sum(federated_data.client_sizes.values()), 2000)
        self.assertEqual(federated_data.label_histograms.sum(), 2000)
        self.assertEqual(federated_data.input_shape, (28, 28, 1))
        self.assertEqual(federated_data.test.cardinality(), 500)
        self.assertIn('synthetic (seed 1)', federated_data.source)

  def test_iid_with_unbalanced_sizes(self):
    federated_data = data.build_federated_data('digits', 'iid', num_clients=5, size_sigma=1.0)
    self.assertIn('lognormal sizes (sigma=1.0)', federated_data.partition_description)
    self.assertEqual(sum(federated_data.client_sizes.values()), 1438)
    self.assertLen(set(federated_data.client_sizes.values()), 5)
    self.assertEqual(federated_data.input_shape, (8, 8, 1))

  def test_mnist_from_data_dir(self):
    directory = self.get_temp_dir()
    rng = np.random.default_rng(0)
    for stem, magic, array in (
      (
        't10k-images-idx3-ubyte',
        sources.IDX_IMAGES_MAGIC,
        rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8),
      ),
      ('t10k-labels-idx1-ubyte', sources.IDX_LABELS_MAGIC, np.arange(40, dtype=np.uint8) % 10),
    ):
      with open(os.path.join(directory, stem), 'wb') as f:
        f.write(magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape))
        f.write(array.tobytes())
    federated_data = data.build_federated_data('mnist', 'shards', num_clients=4, data_dir=directory)
    self.assertIn('test split only', federated_data.source)
    self.assertEqual(sum(federated_data.client_sizes.values()), 32)
    self.assertEqual(federated_data.test.cardinality(), 8)

  def test_invalid_arguments(self):
    for kwargs, error, message in (
      (dict(dataset='cifar10'), ValueError, "`dataset` must be one of .* Found 'cifar10'"),
      (
        dict(dataset='synthetic', partition='natural'),
        ValueError,
        "`partition` must be one of .* Found 'natural'",
      ),
      (dict(dataset='emnist'), ValueError, "`partition` must be 'natural' for 'emnist'"),
      (
        dict(dataset='synthetic', partition='dirichlet', dirichlet_alpha=-1),
        ValueError,
        '`alpha` must be > 0. Found -1.',
      ),
    ):
      with self.subTest(**{k: str(v) for k, v in kwargs.items()}):
        with self.assertRaisesRegex(error, message):
          data.build_federated_data(**kwargs)


def fake_emnist_client_data(num_writers: int, examples_per_writer: int):
  """ClientData shaped like TFF's EMNIST: OrderedDict(label=int32 [], pixels=float32 [28, 28])."""
  rng = np.random.default_rng(num_writers * examples_per_writer)
  writer_ids = [f'f{writer:04d}_00' for writer in range(num_writers)]
  pixels = rng.random((num_writers, examples_per_writer, 28, 28)).astype(np.float32)
  labels = rng.integers(0, 10, size=(num_writers, examples_per_writer)).astype(np.int32)

  def dataset_fn(client_id: str) -> tf.data.Dataset:
    writer = tf.where(tf.equal(writer_ids, client_id))[0, 0]  # Traceable, like SqlClientData.
    return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(label=tf.gather(labels, writer), pixels=tf.gather(pixels, writer))
    )

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(writer_ids, dataset_fn)


class EmnistTest(tf.test.TestCase):
  def test_element_mapping_inverts_pixels(self):
    pixels = np.linspace(0.0, 1.0, 28 * 28, dtype=np.float32).reshape(28, 28)
    element = federated.emnist_to_model_input(
      collections.OrderedDict(label=tf.constant([7], tf.int32), pixels=tf.constant(pixels))
    )
    self.assertEqual(element['x'].shape, (28, 28, 1))
    self.assertEqual(element['x'].dtype, tf.float32)
    self.assertAllClose(element['x'][..., 0], 1.0 - pixels)
    self.assertEqual(element['y'].shape, ())
    self.assertEqual(element['y'].dtype, tf.int32)
    self.assertEqual(element['y'], 7)

  def test_federated_emnist_samples_writers(self):
    train = fake_emnist_client_data(num_writers=6, examples_per_writer=5)
    test = fake_emnist_client_data(num_writers=6, examples_per_writer=2)
    federated_data = federated.federated_emnist(train, test, num_clients=3, seed=0, source='fake')
    again = federated.federated_emnist(train, test, num_clients=3, seed=0, source='fake')
    self.assertEqual(federated_data.train.client_ids, again.train.client_ids)
    self.assertLen(federated_data.train.client_ids, 3)
    self.assertContainsSubset(federated_data.train.client_ids, train.client_ids)
    self.assertEqual(
      federated_data.train.element_type_structure,
      collections.OrderedDict(
        x=tf.TensorSpec([28, 28, 1], tf.float32), y=tf.TensorSpec([], tf.int32)
      ),
    )
    self.assertEqual(federated_data.test.element_spec, federated_data.train.element_type_structure)
    self.assertEqual(len(list(federated_data.test)), 12)
    client_id = federated_data.train.client_ids[0]
    labels = [int(e['label']) for e in train.create_tf_dataset_for_client(client_id)]
    self.assertAllEqual(federated_data.label_histograms[0], np.bincount(labels, minlength=10))
    self.assertEqual(federated_data.client_sizes, dict.fromkeys(federated_data.train.client_ids, 5))
    self.assertIn('3 of 6 writers', federated_data.partition_description)

  def test_too_many_clients_raises(self):
    train = fake_emnist_client_data(num_writers=2, examples_per_writer=1)
    with self.assertRaisesRegex(ValueError, r'`num_clients` must be in \[1, 2\]. Found 3.'):
      federated.federated_emnist(train, train, num_clients=3, seed=0, source='fake')

  def test_load_failure_says_network_is_needed(self):
    with mock.patch.object(
      tff.simulation.datasets.emnist, 'load_data', side_effect=OSError('unreachable')
    ):
      with self.assertRaisesRegex(sources.DataSourceError, 'needs network access'):
        data.build_federated_data('emnist', 'natural')


class PreprocessTest(tf.test.TestCase):
  def dataset(self, num_examples: int = 10) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(
        x=tf.zeros([num_examples, 2, 2, 1]), y=tf.range(num_examples, dtype=tf.int32)
      )
    )

  def test_training_batches_and_repeats(self):
    batches = list(federated.preprocess_for_training(self.dataset(), 4, 3, seed=0))
    self.assertEqual([len(batch['y']) for batch in batches], [4] * 7 + [2])
    self.assertEqual(batches[0]['x'].shape, (4, 2, 2, 1))
    labels = np.concatenate([batch['y'] for batch in batches])
    self.assertAllEqual(np.bincount(labels), [3] * 10)
    self.assertNotAllEqual(labels[:10], np.arange(10))  # Shuffled.

  def test_seeded_training_order_is_reproducible(self):
    def labels(seed):
      dataset = federated.preprocess_for_training(self.dataset(50), 8, 1, seed=seed)
      return np.concatenate([batch['y'] for batch in dataset])

    self.assertAllEqual(labels(1), labels(1))
    self.assertNotAllEqual(labels(1), labels(2))

  def test_seeded_order_is_the_same_every_epoch_and_iteration(self):
    dataset = federated.preprocess_for_training(self.dataset(20), 20, 2, seed=3)
    first_pass = [batch['y'].numpy() for batch in dataset]
    second_pass = [batch['y'].numpy() for batch in dataset]
    self.assertAllEqual(first_pass[0], first_pass[1])
    self.assertAllEqual(first_pass, second_pass)

  def test_unseeded_order_changes_every_epoch(self):
    dataset = federated.preprocess_for_training(self.dataset(20), 20, 2, seed=None)
    first_epoch, second_epoch = [batch['y'].numpy() for batch in dataset]
    self.assertNotAllEqual(first_epoch, second_epoch)

  def test_training_pipeline_is_traceable_by_tff(self):
    element_type = tff.types.tensorflow_to_type(self.dataset().element_spec)
    computation = tff.tensorflow.computation(
      lambda dataset: federated.preprocess_for_training(dataset, 4, 2, seed=0),
      tff.SequenceType(element_type),
    )
    self.assertEqual(str(computation.type_signature.result), '<x=float32[?,2,2,1],y=int32[?]>*')

  def test_seeded_order_matches_a_python_int_seed(self):
    # preprocess_for_training hands integer seeds to TensorFlow as numpy int64s.
    dataset = tf.data.Dataset.range(300)
    for seed in (0, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**70):
      with self.subTest(seed=seed):
        expected = dataset.shuffle(1000, seed=seed, reshuffle_each_iteration=False).repeat(2)
        batches = federated.preprocess_for_training(dataset, 32, 2, seed=seed)
        self.assertAllEqual(np.concatenate(list(batches)), list(expected))

  def test_evaluation_batches_in_order(self):
    batches = list(federated.preprocess_for_evaluation(self.dataset(), 4))
    self.assertAllEqual(np.concatenate([batch['y'] for batch in batches]), np.arange(10))
    self.assertEqual([len(batch['y']) for batch in batches], [4, 4, 2])

  def test_invalid_arguments(self):
    for call, message in (
      (
        lambda: federated.preprocess_for_training(self.dataset(), 0, 1, 0),
        '`batch_size` must be an integer >= 1. Found 0.',
      ),
      (
        lambda: federated.preprocess_for_training(self.dataset(), 2, 0, 0),
        '`local_epochs` must be an integer >= 1. Found 0.',
      ),
      (
        lambda: federated.preprocess_for_training(self.dataset(), 2, 1, 0, shuffle_buffer=0),
        '`shuffle_buffer` must be an integer >= 1. Found 0.',
      ),
      (
        lambda: federated.preprocess_for_evaluation(self.dataset(), 2.5),
        '`batch_size` must be an integer >= 1. Found 2.5.',
      ),
    ):
      with self.subTest(message=message):
        with self.assertRaisesRegex(ValueError, message):
          call()
