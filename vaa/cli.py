"""The `vaa` console script: a thin Hydra entry point around the pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vaa.config.schema import register

register()
# conf/ sits beside the package in the repository (installed editable: `pip install -e .`).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from vaa.pipeline.run import run_pipeline  # heavy imports after Hydra parsed the CLI

    metrics = run_pipeline(cfg, HydraConfig.get().runtime.output_dir)
    return metrics["harmful_score"]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
