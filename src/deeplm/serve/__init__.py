"""Serving: an OpenAI-compatible HTTP API over a deeplm model (``deeplm serve``).

See :mod:`deeplm.serve.server` for the endpoints, validation and concurrency rules.
"""

from deeplm.serve.server import APIError, ModelService, make_server, serve

__all__ = ["APIError", "ModelService", "make_server", "serve"]
