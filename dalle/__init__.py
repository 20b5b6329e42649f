"""dalle: an open implementation of DALL-E (Ramesh et al. 2021) in PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["DallePipeline", "__version__"]


def __getattr__(name: str):
    # Imported lazily so `import dalle` (and the CLI's start-up) stays fast.
    if name == "DallePipeline":
        from dalle.pipeline import DallePipeline

        return DallePipeline
    raise AttributeError(f"module 'dalle' has no attribute {name!r}")
