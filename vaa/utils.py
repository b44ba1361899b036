"""Process-wide settings for a quiet, readable run."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Keep the console to our progress bars and summary: no per-load progress bars from
    transformers, no hardware banners or tips from Lightning, no known-harmless warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    # lightning 2.6 builds torch's deprecated LeafSpec on every step's outputs (torch ≥ 2.10)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # VAA's loader yields step placeholders from a sized IterableDataset, on purpose
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
