"""Other frameworks' networks in keras-ee: the authors' PyTorch checkpoints, read without torch.

`load_torch_checkpoint(path)` returns a keras-ee `keras.Model` whose logits equal the authors'
PyTorch model's with the same weights; `import_torch_checkpoint` also returns an `ImportReport`
(what was read, found and ignored). `read_torch_file` is the torch-free, restricted reader of
`torch.save` files beneath them. See docs/import.md.
"""

from keras_ee.interop.torch_file import CheckpointError, UnsafeCheckpointError, read_torch_file
from keras_ee.interop.torch_import import (
    CheckpointMismatchError,
    ImportReport,
    import_torch_checkpoint,
    load_torch_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ImportReport",
    "UnsafeCheckpointError",
    "import_torch_checkpoint",
    "load_torch_checkpoint",
    "read_torch_file",
]
