"""mimkit: masked-image-modeling pretraining for timm Vision Transformers."""

__version__ = "0.2.0.dev0"

from mimkit.config import Config, ConfigError, load_config  # noqa: E402
from mimkit.errors import MimkitError  # noqa: E402
from mimkit.runs import EXIT_STOPPED, RunStopped  # noqa: E402
from mimkit.train import pretrain, run  # noqa: E402

__all__ = ["EXIT_STOPPED", "Config", "ConfigError", "MimkitError", "RunStopped", "load_config", "pretrain", "run",
           "__version__"]
