"""Shared test settings: quiet third-party logs and a fixed thread count for repeatable timing."""

import logging

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield
