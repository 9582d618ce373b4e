from .adapters import ADAPTERS, MoEAdapter, adapter_for
from .checkpoint import Checkpoint, resolve_model

__all__ = ["ADAPTERS", "MoEAdapter", "adapter_for", "Checkpoint", "resolve_model"]
