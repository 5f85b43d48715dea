"""mirrorgate's admission webhook: rewrites Pod images to the in-cluster registry mirror."""

__version__ = "0.1.0"
