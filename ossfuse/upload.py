"""Compatibility name: the uploader lives in :mod:`ossfuse.writeback.upload` (``rekey`` still
imports it from here; its owner moves that import, then this module goes)."""
from .writeback.upload import Uploader, part_size_for  # noqa: F401

__all__ = ["Uploader", "part_size_for"]
