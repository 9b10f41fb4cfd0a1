"""Serving: an OpenAI-compatible HTTP API over a deeplm model (``deeplm serve``).

See :mod:`deeplm.serve.server` for the endpoints, validation and limits, and
:mod:`deeplm.serve.scheduler` for the bounded queue and batched decoding.
"""

from deeplm.serve.server import APIError, DeeplmServer, Limits, ModelService, make_server, serve

__all__ = ["APIError", "DeeplmServer", "Limits", "ModelService", "make_server", "serve"]
