"""The exceptions a user's input can cause (a config, a workdir, a checkpoint, a weights or
cache folder): the commands print their message in one line and exit 1 instead of a
traceback (``--debug`` shows it)."""
from __future__ import annotations

from jaxdit.errors import ConfigError
from jaxdit.convert.common import ConversionError
from jaxdit.data.cache import CacheError
from jaxdit.models.pretrained_text import UnsupportedEncoder
from jaxdit.parallel.mesh import MeshConfigError
from jaxdit.train.checkpoint import CheckpointError
from jaxdit.train.health import TrainingDiverged
from jaxdit.train.workdir_lock import WorkdirBusy

# FileNotFoundError: a missing weights folder, text encoder or image folder named by the config.
INPUT_ERRORS = (ConfigError, MeshConfigError, CheckpointError, CacheError, ConversionError,
                UnsupportedEncoder, FileNotFoundError)
TRAIN_ERRORS = INPUT_ERRORS + (TrainingDiverged, WorkdirBusy)
