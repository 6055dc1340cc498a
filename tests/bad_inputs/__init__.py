"""The bad-input matrix: every smoe op and public module against a table of bad inputs.

``cases.py`` and its per-family parts hold the declarative table, ``run.py`` runs each case in
its own forked child and classifies the outcome (``python tests/bad_inputs/run.py --device cpu``
regenerates ``REPORT.md``); ``test_matrix.py`` gates CI on it, ``test_runner.py`` tests the
runner itself.
"""
