"""Shared test setup: the tests folder on sys.path for the reference and helper modules."""

import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

# The machines are small and shared: keep tests on two threads, as CI has two cores.
torch.set_num_threads(2)

# No test may download anything: make any Hugging Face Hub access fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture()
def process_group(tmp_path):
    """A single-process gloo group (world size 1), destroyed whatever the test does."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'process_group'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
