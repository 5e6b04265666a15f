"""Type aliases shared by the package's annotations (no runtime behaviour)."""

import os
from typing import TypeAlias

# A file system path as the public functions accept it: a str or a pathlib.Path.
StrPath: TypeAlias = str | os.PathLike[str]
