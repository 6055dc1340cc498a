"""Data shipped with smoe (nothing is downloaded unless asked).

- :mod:`smoe.data.quickdraw`: Quick, Draw! bitmaps (Google Creative Lab, CC BY 4.0): the subset
  shipped in this package, or Google's official ``full_numpy_bitmap_<category>.npy`` files from a
  directory. Attribution: "QuickDraw subset: The Quick, Draw! Dataset, Google Creative Lab, CC BY
  4.0 (https://github.com/googlecreativelab/quickdraw-dataset); subset selected and repacked,
  pixels unmodified." Provenance: ``smoe/data/quickdraw/README.md``.
- :mod:`smoe.data.text`: Tiny Shakespeare (public domain, from Andrej Karpathy's char-rnn),
  a character vocabulary and batches for the char-level LM, and :func:`word_swap`, the
  attacked-text protocol. Provenance: ``smoe/data/tinyshakespeare/README.md``.
"""

from smoe.data.text import word_swap

__all__ = ["word_swap"]
