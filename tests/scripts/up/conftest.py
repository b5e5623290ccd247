"""Fixtures of the launcher's tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def no_docker(tmp_path):
    """A PATH whose `docker` answers like a machine without an engine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
