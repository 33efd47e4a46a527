"""elvesfs: a FUSE filesystem that stores model files as deduplicated, individually coded tensors."""

__version__ = "0.1.0"
