"""Library-wide constants."""

DEFAULT_HIDDEN_SIZE = 768
DEFAULT_NUM_EXPERTS = 8
DEFAULT_EXPERTS_PER_TOKEN = 2
MAX_EXPERTS_SUPPORTED = 1024

#: Label value ignored by the language-model loss (as in PyTorch and transformers).
IGNORE_INDEX = -100
