"""The package version, in a leaf module: modules that record it import this, not `mimkit` (whose __init__
imports the training loop, which would close an import cycle)."""

__version__ = "0.2.0.dev0"
