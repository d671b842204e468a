"""Process settings for the command-line entry points (never applied on library import).

TensorFlow (the input pipeline) prints C++ INFO lines when it loads: absl's pre-init notice, the
CPU-feature note, and on x86 CPUs "oneDNN custom operations are on" (that one ignores the log
level). On stderr they come before a command's own one-line error. The commands therefore keep
TensorFlow's warnings and errors only, and turn oneDNN's custom kernels off, which also makes
TF's float ops (the pipeline's resizes) the same on every CPU. Call ``quiet_tensorflow()`` before
TensorFlow is imported; a value the user set in the environment wins.
"""

import os


def quiet_tensorflow() -> None:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
