"""Tests for tff_clipq.data.partition: coverage, balance, label skew, determinism, errors."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tff_clipq.data import partition

# 1,000 examples, 100 per class, in a shuffled order.
LABELS = np.random.default_rng(0).permutation(np.arange(1000) % 10)


class PartitionTestCase(tf.test.TestCase, parameterized.TestCase):
  def assert_is_partition(self, parts: list[np.ndarray], num_examples: int) -> None:
    """Every example index appears in exactly one client, once."""
    for part in parts:
      self.assertEqual(part.dtype, np.int64)
    self.assertAllEqual(np.sort(np.concatenate(parts)), np.arange(num_examples))


class IidTest(PartitionTestCase):
  @parameterized.parameters((1000, 10), (1003, 7), (5, 5), (10, 1))
  def test_balanced_partition(self, num_examples, num_clients):
    parts = partition.partition_iid(num_examples, num_clients, seed=1)
    self.assertLen(parts, num_clients)
    self.assert_is_partition(parts, num_examples)
    sizes = [len(part) for part in parts]
    self.assertLessEqual(max(sizes) - min(sizes), 1)

  def test_clients_are_shuffled_mixtures(self):
    parts = partition.partition_iid(1000, 10, seed=1)
    histogram = partition.label_histogram(LABELS, parts, 10)
    self.assertGreater(histogram.min(), 0)

  def test_unbalanced_sizes(self):
    parts = partition.partition_iid(1000, 20, seed=2, size_sigma=1.0)
    self.assert_is_partition(parts, 1000)
    sizes = np.array([len(part) for part in parts])
    self.assertGreaterEqual(sizes.min(), 1)
    self.assertGreater(sizes.max(), 3 * sizes.min())

  def test_unbalanced_sizes_keep_one_example_per_client(self):
    parts = partition.partition_iid(30, 30, seed=2, size_sigma=3.0)
    self.assertAllEqual([len(part) for part in parts], [1] * 30)

  def test_deterministic_given_seed(self):
    first = partition.partition_iid(100, 4, seed=3, size_sigma=0.5)
    again = partition.partition_iid(100, 4, seed=3, size_sigma=0.5)
    other = partition.partition_iid(100, 4, seed=4, size_sigma=0.5)
    for a, b in zip(first, again):
      self.assertAllEqual(a, b)
    self.assertNotAllEqual(np.concatenate(first), np.concatenate(other))

  @parameterized.named_parameters(
    ('no_clients', dict(num_examples=10, num_clients=0, seed=0), '`num_clients` must be >= 1'),
    (
      'more_clients_than_examples',
      dict(num_examples=3, num_clients=4, seed=0),
      r'`num_clients` must be <= the number of examples \(3\). Found 4.',
    ),
    (
      'negative_sigma',
      dict(num_examples=10, num_clients=2, seed=0, size_sigma=-1.0),
      '`size_sigma` must be >= 0. Found -1.0.',
    ),
    ('no_examples', dict(num_examples=0, num_clients=1, seed=0), '`num_examples` must be >= 1'),
  )
  def test_invalid_arguments(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      partition.partition_iid(**kwargs)


class DirichletTest(PartitionTestCase):
  def test_is_partition(self):
    parts = partition.partition_dirichlet(LABELS, 10, alpha=0.5, seed=0)
    self.assertLen(parts, 10)
    self.assert_is_partition(parts, 1000)

  def test_small_alpha_gives_skewed_clients(self):
    parts = partition.partition_dirichlet(LABELS, 10, alpha=0.05, seed=0)
    histogram = partition.label_histogram(LABELS, parts, 10)
    nonempty = histogram[histogram.sum(1) > 0]
    fractions = nonempty / nonempty.sum(1, keepdims=True)
    # A balanced client has 10 classes of 10% each; these hold few classes, one dominant.
    self.assertGreater(fractions.max(1).mean(), 0.5)
    self.assertLessEqual((fractions > 0.05).sum(1).mean(), 3)

  def test_large_alpha_gives_near_uniform_clients(self):
    parts = partition.partition_dirichlet(LABELS, 10, alpha=1000.0, seed=0)
    histogram = partition.label_histogram(LABELS, parts, 10)
    fractions = histogram / histogram.sum(1, keepdims=True)
    self.assertAllClose(fractions, np.full((10, 10), 0.1), atol=0.05)

  def test_deterministic_given_seed(self):
    first = partition.partition_dirichlet(LABELS, 5, alpha=0.3, seed=7)
    again = partition.partition_dirichlet(LABELS, 5, alpha=0.3, seed=7)
    other = partition.partition_dirichlet(LABELS, 5, alpha=0.3, seed=8)
    for a, b in zip(first, again):
      self.assertAllEqual(a, b)
    self.assertNotAllEqual([len(part) for part in first], [len(part) for part in other])

  def test_empty_clients_are_found(self):
    labels = np.arange(20) % 2
    parts = partition.partition_dirichlet(labels, 30, alpha=0.01, seed=0)
    self.assert_is_partition(parts, 20)
    empty = partition.find_empty_clients(parts)
    self.assertNotEmpty(empty)
    self.assertEqual(empty, [c for c, part in enumerate(parts) if len(part) == 0])

  @parameterized.named_parameters(
    ('negative_alpha', dict(alpha=-1), '`alpha` must be > 0. Found -1.'),
    ('zero_alpha', dict(alpha=0.0), '`alpha` must be > 0. Found 0.0.'),
    ('infinite_alpha', dict(alpha=np.inf), '`alpha` must be > 0. Found inf.'),
    ('no_clients', dict(num_clients=0), '`num_clients` must be >= 1. Found 0.'),
    ('float_labels', dict(labels=np.zeros(4)), '`labels` must be a non-empty 1-D integer'),
    ('negative_labels', dict(labels=np.array([0, -2])), '`labels` must be non-negative'),
  )
  def test_invalid_arguments(self, overrides, message):
    kwargs = dict(labels=LABELS, num_clients=4, alpha=0.5, seed=0) | overrides
    with self.assertRaisesRegex(ValueError, message):
      partition.partition_dirichlet(**kwargs)


class ShardsTest(PartitionTestCase):
  @parameterized.parameters(1, 2, 5)
  def test_clients_hold_at_most_shards_per_client_labels(self, shards_per_client):
    # 100 examples per class and shards of 1000 / (10 * s) examples: boundaries match classes.
    parts = partition.partition_shards(LABELS, 10, shards_per_client, seed=0)
    self.assert_is_partition(parts, 1000)
    self.assertAllEqual([len(part) for part in parts], [100] * 10)
    histogram = partition.label_histogram(LABELS, parts, 10)
    self.assertAllLessEqual((histogram > 0).sum(1), shards_per_client)

  def test_two_shards_give_pathological_skew(self):
    parts = partition.partition_shards(LABELS, 50, 2, seed=0)  # Shards of 10 examples.
    histogram = partition.label_histogram(LABELS, parts, 10)
    self.assertAllLessEqual((histogram > 0).sum(1), 2)
    self.assertAllEqual(histogram.sum(0), [100] * 10)

  def test_uneven_shards_still_partition(self):
    parts = partition.partition_shards(LABELS[:997], 7, 3, seed=1)
    self.assert_is_partition(parts, 997)
    histogram = partition.label_histogram(LABELS[:997], parts, 10)
    self.assertAllLessEqual((histogram > 0).sum(1), 2 * 3)

  def test_deterministic_given_seed(self):
    first = partition.partition_shards(LABELS, 10, 2, seed=5)
    again = partition.partition_shards(LABELS, 10, 2, seed=5)
    other = partition.partition_shards(LABELS, 10, 2, seed=6)
    for a, b in zip(first, again):
      self.assertAllEqual(a, b)
    self.assertNotAllEqual(np.concatenate(first), np.concatenate(other))

  @parameterized.named_parameters(
    ('no_shards', dict(shards_per_client=0), '`shards_per_client` must be >= 1. Found 0.'),
    ('float_shards', dict(shards_per_client=1.5), '`shards_per_client` must be an integer'),
    (
      'too_many_shards',
      dict(num_clients=10, shards_per_client=101),
      r'`num_clients \* shards_per_client` must be <= the number of examples \(1000\). '
      r'Found 10 \* 101 = 1010.',
    ),
    ('too_many_clients', dict(num_clients=1001), '`num_clients` must be <='),
  )
  def test_invalid_arguments(self, overrides, message):
    kwargs = dict(labels=LABELS, num_clients=10, shards_per_client=2, seed=0) | overrides
    with self.assertRaisesRegex(ValueError, message):
      partition.partition_shards(**kwargs)


class LabelHistogramTest(tf.test.TestCase):
  def test_counts_labels_per_client(self):
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([], np.int64), np.array([1, 2, 4, 5])]
    self.assertAllEqual(
      partition.label_histogram(labels, parts, num_classes=4),
      [[1, 0, 1, 0], [0, 0, 0, 0], [0, 2, 2, 0]],
    )
    self.assertEqual(partition.find_empty_clients(parts), [1])

  def test_label_beyond_num_classes_raises(self):
    with self.assertRaisesRegex(ValueError, r'`labels` must be < `num_classes` \(2\). Found 2.'):
      partition.label_histogram(np.array([0, 2]), [np.array([0, 1])], num_classes=2)
