"""Pytest setup shared by all tests.

absl flags are marked parsed (tf.test utilities need them), and TFF computations run in the
project's leak-free local execution context, which owns its worker_binary process and stops it
at exit, instead of TFF's default one, which can outlive the test run.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top

from tff_clipq import runtime  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()
runtime.set_local_execution_context()
