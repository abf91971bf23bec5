"""arle runtime: load a bundle, execute its compiled steps, generate, serve.

Stays lean on purpose: imports torch, safetensors, tokenizers, jinja2 (and the server
stack), never the compiler, TVM, ONNX or transformers.
"""

from .errors import ArleError

__all__ = ["ArleError"]
