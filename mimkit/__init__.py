"""mimkit: masked-image-modeling pretraining for timm Vision Transformers."""

from mimkit.compare import compare  # noqa: E402
from mimkit.config import Config, ConfigError, load_config  # noqa: E402
from mimkit.errors import MimkitError  # noqa: E402
from mimkit.eval.embed import embed  # noqa: E402
from mimkit.runs import EXIT_STOPPED, RunStopped  # noqa: E402
from mimkit.train import pretrain, run  # noqa: E402
from mimkit.version import __version__  # noqa: E402

__all__ = [
    "EXIT_STOPPED",
    "Config",
    "ConfigError",
    "MimkitError",
    "RunStopped",
    "compare",
    "embed",
    "load_config",
    "pretrain",
    "run",
    "__version__",
]
