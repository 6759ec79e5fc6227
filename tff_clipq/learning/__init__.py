"""Models, quantization-aware training and learning-process builders."""

from tff_clipq.learning.models import build_tff_model_fn
from tff_clipq.learning.models import create_keras_model
from tff_clipq.learning.models import MODEL_NAMES
from tff_clipq.learning.process import AggregatorConfig
from tff_clipq.learning.process import build_learning_process
from tff_clipq.learning.process import ProcessConfig
from tff_clipq.learning.qat import apply_qat
from tff_clipq.learning.qat import QatConfig
