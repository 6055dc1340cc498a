"""Integrations with other libraries, each imported on demand (``import smoe`` imports none):

- ``smoe.integrations.transformers``: registers ``experts_implementation="smoe"`` with
  transformers' experts interface.
"""
