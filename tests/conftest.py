import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI everything a test needs is installed, so a skip means a missing install step: fail it instead."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be missing: {report.longrepr}"


def pytest_collection_modifyitems(items):
    """The markers of pyproject.toml by where a test lives (`-m "not e2e"`: the fast suite, seconds to minutes); and
    the longest first: the container tests (one file, one xdist worker: they share an engine and its images), then
    the other end-to-end tests, so that with `-n 2 --dist loadfile` (.ci/run) no long file starts last."""
    for item in items:
        path = Path(str(item.fspath))
        if "e2e" in path.parts:
            item.add_marker(pytest.mark.e2e)
        if path.name == "test_containers.py":
            item.add_marker(pytest.mark.docker)
        if "chromium" in item.name:
            item.add_marker(pytest.mark.browser)
    items.sort(key=lambda item: 0 if item.get_closest_marker("docker") else 1 if item.get_closest_marker("e2e") else 2)
