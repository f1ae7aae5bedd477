"""Inference backends behind one interface: torch, ONNX Runtime, TensorRT (see :mod:`.base`)."""

from .base import Backend, BackendError, BackendOptions, create_backend, resolve_device

__all__ = ["Backend", "BackendError", "BackendOptions", "create_backend", "resolve_device"]
