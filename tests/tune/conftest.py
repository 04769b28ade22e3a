"""Make the helpers next to these tests (experiment_cli.py) importable by name: pytest runs
with ``--import-mode=importlib``, which gives test modules no sibling imports (as in
tests/methods/conftest.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
