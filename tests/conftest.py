"""Pytest setup shared by all tests: absl flags parsed (tf.test helpers need them)."""

from absl import flags

flags.FLAGS.mark_as_parsed()
