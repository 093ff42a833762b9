"""Profile gradwatch's own entry (`train(cfg)`) with cProfile: where a run's time goes.

.venv/bin/python scripts/bench_profile.py trainer.max_epochs=2000 [more Hydra overrides]
"""

import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from gradwatch.train import train

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main(overrides: list[str], sort: str = "tottime", limit: int = 35) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[f"paths.output_dir={tmp}", *overrides],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        profile = cProfile.Profile()
        profile.enable()
        metrics = train(cfg)
        profile.disable()
    print(f"fit_seconds {metrics['fit_seconds']:.3f}")
    stats = pstats.Stats(profile).strip_dirs().sort_stats(sort)
    stats.print_stats(limit)


if __name__ == "__main__":
    args = sys.argv[1:]
    sort = next((a.split("=", 1)[1] for a in args if a.startswith("--sort=")), "tottime")
    main([a for a in args if not a.startswith("--sort=")], sort)
