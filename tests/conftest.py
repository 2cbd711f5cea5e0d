"""Session-wide fixtures shared by every test package."""

from pathlib import Path

import pytest

# The real redis-server and S3 server (tests/services.py), one of each per session for every package.
pytest_plugins = ["tests.services"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A "tiny" Wan2.2 T2V checkpoint (seed 0, two experts), built once per session. Treat as read-only."""
    from models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_model") / "wan22-tiny", size="tiny", seed=0)
