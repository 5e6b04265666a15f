"""A quiet start for the command line: TensorFlow's start-up lines filtered from stderr.

Importing TensorFlow 2.18+ writes lines such as

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:... port.cc:153] oneDNN custom operations are on. ...

straight to file descriptor 2 from C++, before `TF_CPP_MIN_LOG_LEVEL` is read, so the variable
alone cannot hide them. `quiet_tensorflow_startup()` (called by `keras-ee` and
`python -m tuning.search` before they import anything heavy) sets `TF_CPP_MIN_LOG_LEVEL=2` and
arranges for the first `import tensorflow` to run with fd 2 captured; afterwards every captured
line is written back except the known start-up notices, so a real error printed while importing
is never lost. Nothing is changed when `KERAS_EE_DEBUG` is set or the user chose their own
`TF_CPP_MIN_LOG_LEVEL`.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import ModuleType

__all__ = ["STARTUP_NOISE", "quiet_tensorflow_startup", "filtered_native_stderr"]

# Substrings of the lines TensorFlow prints on every start, whatever the log level.
STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
)


@contextlib.contextmanager
def filtered_native_stderr(drop: Sequence[str] = STARTUP_NOISE) -> Iterator[None]:
    """Capture file descriptor 2 (C++ and Python writes alike) for the block, then write back
    every line that contains none of `drop`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not any(noise in line for noise in drop)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of `tensorflow` inside `filtered_native_stderr`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with filtered_native_stderr():
            self._loader.exec_module(module)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` with the other finders and wraps its loader, once."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import only; later imports of tensorflow are cached
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def quiet_tensorflow_startup() -> None:
    """Hide TensorFlow's start-up lines for this process (see the module docstring).

    A no-op when `KERAS_EE_DEBUG` is set, when the user set `TF_CPP_MIN_LOG_LEVEL` themselves,
    or when TensorFlow is already imported.
    """
    if os.environ.get("KERAS_EE_DEBUG") or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowFinder())
