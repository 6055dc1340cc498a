"""How a spawned Gloo rank ends: every rank waits for the others (no rank closes its connections
while another is still in a collective), destroys the process groups, and leaves through
``os._exit(0)`` so that the interpreter's finalisation never runs. A rank of
hf_ep_worker.py aborted once in CI and once in ~100 local runs after its work was done
("terminate called without an active exception", SIGABRT); the likely cause is a process group
still referenced (transformers' device meshes hold some) being freed during finalisation."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def end_rank() -> None:
    """Call once a rank's work succeeded; on an error, let the exception propagate instead."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
