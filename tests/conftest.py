"""Shared fixtures: offline hub, a per-session tiny-model zoo saved and loaded with diffusers' real loaders."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the hub

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def zoo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo")
    os.environ["ATTNEDIT_ZOO_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe(zoo_dir):
    """Factory: tiny_pipe(family) -> the family's tiny pipeline, saved then loaded once per session."""
    from attnedit.models import zoo

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = zoo.load_tiny_pipeline(family, cache_dir=zoo_dir)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models run as fast on one torch thread, and far faster when other processes share the cores
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a test module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
