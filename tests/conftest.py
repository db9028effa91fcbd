"""Shared test setup: offline, quiet, a tiny model built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from rbvl.data.synthetic import write_tiny_manifest  # noqa: E402 - tests import it from here too


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_manifest(tmp_path):
    """A 3-domain regrouped shard set with an eval split (see `write_tiny_manifest`)."""
    return write_tiny_manifest(tmp_path / "shards")
