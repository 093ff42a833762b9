"""Shared fixtures: compose the real conf/ tree the way Hydra's command line would."""

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
sys.path.insert(0, str(ROOT / "scripts"))


def wait_for(path_glob: str, root: Path, timeout: float = 120) -> Path:
    """The first path under `root` matching `path_glob`, once one exists (a run started in a
    subprocess writing its checkpoint, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.glob(path_glob))
        if found:
            return found[0]
        time.sleep(0.05)
    raise TimeoutError(path_glob)


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `python -m gradwatch.train <overrides>` would get, writing into output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: the tests' networks are tiny, and on a shared 2-core machine a second
    thread only waits for the first (a 1 s run took 8-20 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """make_cfg("optimizer=adam", ...) -> a composed config whose run directory is tmp_path/run."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(list(overrides), tmp_path / "run")

    yield make
    GlobalHydra.instance().clear()
