"""Integrations with other libraries, each imported on demand (``import smoe`` imports none):

- ``smoe.integrations.transformers``: registers ``experts_implementation="smoe"`` with
  transformers' experts interface.
- ``smoe.integrations.convert``: ``smoe.convert`` / ``smoe.unconvert``, transformers MoE blocks
  replaced by smoe layers (routers on smoe's ops, ``hf_routers``).
"""
