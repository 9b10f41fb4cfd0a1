"""Serving: an OpenAI-compatible HTTP API over a deeplm model (``deeplm serve``).

See :mod:`deeplm.serve.server` for the endpoints and limits, :mod:`deeplm.serve.schemas` for
the request schemas and validation, and :mod:`deeplm.serve.scheduler` for the bounded queue and
batched decoding.
"""

from deeplm.serve.schemas import APIError
from deeplm.serve.server import DeeplmServer, Limits, ModelService, make_server, serve

__all__ = ["APIError", "DeeplmServer", "Limits", "ModelService", "make_server", "serve"]
