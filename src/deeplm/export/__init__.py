"""Model input/output: Hugging Face export and import (:mod:`deeplm.export.hf`), and loading a
model for inference (:mod:`deeplm.export.loading`).

:func:`load_model` is what ``deeplm generate``, ``chat``, ``eval`` and ``serve`` use to get a
model and its tokenizer from any of: a run directory (its newest checkpoint), a checkpoint folder
(inside a run directory), or an export folder written by :func:`~deeplm.export.hf.export_hf`.
"""

from deeplm.export.hf import ExportError, export_hf, import_hf, is_hf_folder
from deeplm.export.loading import LoadedModel, load_checkpoint, load_model

__all__ = [
    "ExportError",
    "LoadedModel",
    "export_hf",
    "import_hf",
    "is_hf_folder",
    "load_checkpoint",
    "load_model",
]
