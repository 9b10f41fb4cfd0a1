"""Data ingestion and cleaning.

* :mod:`deeplm.data.sources` reads documents from a configured source (packaged offline corpora,
  local ``.txt``/``.md``/``.jsonl``/``.parquet`` files, or a streamed Hugging Face dataset).
* :mod:`deeplm.data.offline` holds the readers of the three packaged public-domain corpora.
* :mod:`deeplm.data.clean` normalises, chunks, filters, deduplicates and splits documents.

Nothing is imported here so that ``import deeplm.data`` stays cheap.
"""
