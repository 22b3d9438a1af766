"""minicompact is an installed package: tests, lessons and bench scripts just `import minicompact`."""
import importlib.metadata
import os

import minicompact


def test_installed_version_matches_the_source():
    assert importlib.metadata.version("minicompact") == minicompact.__version__


def test_the_import_is_this_checkout():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(os.path.dirname(os.path.abspath(minicompact.__file__))) == root
