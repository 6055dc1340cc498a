"""Checkpoint compatibility: the pinned state_dict schema, committed fixtures, load paths."""
