"""Shared unit-test fixtures: board trees generated from lab/boards.py, the lab's own table.

Fixtures and the lab boards come from the same real-board data, so they can't drift.
"""

import importlib.util
import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BOARDS_PY = os.path.join(REPO, "lab", "boards.py")


def load_boards():
    spec = importlib.util.spec_from_file_location("rkllm_lab_boards", BOARDS_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def boards():
    """The lab/boards.py module (its BOARDS table and build())."""
    return load_boards()


@pytest.fixture
def board_tree(boards, tmp_path):
    """Factory: build a board KIND under a fresh directory and return that sysroot (a str).

    Device nodes are links to /dev/null (a real character device), as boards.py makes them
    without --link-dev.
    """
    def build(kind, name=None):
        root = tmp_path / (name or kind)
        boards.build(kind, str(root))
        return str(root)
    return build
