"""Importing smoe where the extension is not built says so, with the build command."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_build_says_it_is_not_built():
    # Hide smoe._build_info (written by the build) as in a fresh, unbuilt source tree.
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Unbuilt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name in ("smoe._build_info", "smoe._C"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Unbuilt())
        try:
            import smoe
        except ImportError as e:
            print("IMPORT-ERROR:", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORT-ERROR: smoe's C++ extension is not built" in out.stdout
    assert "pip install --no-build-isolation" in out.stdout
    assert "circular import" not in out.stdout
