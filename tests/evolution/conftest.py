"""Make the helpers next to these tests (oracle.py, we_builders.py) importable by name."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
