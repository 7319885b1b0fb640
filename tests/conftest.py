"""Shared test setup: the tests folder on sys.path for the reference and helper modules."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# The machines are small and shared: keep tests on two threads, as CI has two cores.
torch.set_num_threads(2)

# No test may download anything: make any Hugging Face Hub access fail at once.
os.environ["HF_HUB_OFFLINE"] = "1"
