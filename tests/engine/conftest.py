"""Engine tests train tiny models on a few images of the synthetic benchmark, one thread."""

from pathlib import Path

import pytest
import torch

from sskd.config import SyntheticDomainConfig
from sskd.data.coco import read_coco
from sskd.data.records import Dataset
from sskd.data.synthetic import generate_domain


def make_dataset(root: Path, n: int = 8, size: int = 32, seed: int = 0) -> Dataset:
    js = generate_domain(SyntheticDomainConfig(max_objects=3), n, size,
                         ["circle", "rectangle", "triangle"], seed, root)
    return read_coco(js, Path(js).parent)


@pytest.fixture
def toy(tmp_path) -> Dataset:
    return make_dataset(tmp_path / "toy")


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
