"""Dynamic Linear Attention for PyTorch: multi-state linear attention whose memory is segmented
by content (`dla.ops`, `dla.model`), and the tools that train, evaluate and serve it (`dla.run`,
the `dla` command). `dla.load(checkpoint)` returns a trained model ready to use."""

from dla.run.checkpoint import load

__version__ = "0.1.0"

__all__ = ["__version__", "load"]
