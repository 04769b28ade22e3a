"""Make the loop harness next to these tests (loop_harness.py) importable by name: pytest runs
with ``--import-mode=importlib``, which gives test modules no sibling imports (as in
tests/evolution/conftest.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
