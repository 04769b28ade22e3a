"""Plain-Python transcriptions of the papers' algorithms, the oracles of the methods that have
no public code (RePr, dynamic attention + BN-scale pruning, sparse binary programming).

Each module is written apart from ``we_dist.methods``: it imports nothing from ``we_dist``,
walks the network itself and computes in Python floats, one filter, pair, channel and element
at a time (as ``tests/evolution/oracle.py`` does for WE). The tests in
``tests/methods/test_oracle_*.py`` feed the same seeded tensors to the oracle and to the
project's method and compare the decisions.
"""
