"""arlec: the arle compiler (sources, quantization, targets, bundles, checks)."""

__version__ = "0.1.0"
