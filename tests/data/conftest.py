import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _plait_cache(tmp_path_factory):
    """Keep every test's image cache in a temporary folder, never in ~/.cache/plait."""
    folder = tmp_path_factory.mktemp("plait-cache")
    old = os.environ.get("PLAIT_CACHE")
    os.environ["PLAIT_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("PLAIT_CACHE", None)
    else:
        os.environ["PLAIT_CACHE"] = old
