"""Loaders, one module per HF model family; importing this package registers them all."""

from convert.loaders import mbart, xlmr  # noqa: F401
