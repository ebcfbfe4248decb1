"""Feeding the keyword indexes from the indexer (a :class:`ChangeListener`).

Only text indexes are followed (:func:`streams.text.keyword.is_text_index`); changes to
plain vector indexes are ignored at once.

The indexer reports each upsert and delete once the vector index took it, and calls
:meth:`KeywordListener.applied` after the batch's state commit and before the applied
positions advance. The listener remembers which ids changed and, on ``applied``, reads
their current entries (meta text, tags, numeric fields) from the node's state and commits
them to the keyword index in one tantivy commit: a search that waits for a position
(``session``/``strong``) sees the keyword index up to date with it.

The upsert report carries no meta, so the text comes from the state. Text-only records
(meta ``"text_only": true``: in the state, not in the vector index) arrive through the
optional ``text_only`` hook and are indexed the same way. The indexer may
report ``applied`` early (catching up ``indexes`` in the middle of a ``vectors`` batch,
before that batch's state commit): an upsert whose entry is not in the state yet, or
whose stored vector/tags are not the reported ones (an older copy), stays pending until
a later ``applied`` finds it committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from streams.index.model import IndexConfig, Vector
from streams.service.indexer import ChangeListener
from streams.service.state import StateStore
from streams.text.keyword import KeywordDoc, KeywordIndexes, doc_from_entry, is_text_index

__all__ = ["KeywordListener", "ListenerFanout"]


@dataclass(slots=True)
class _Upsert:
    vector: Vector
    tags: tuple[str, ...]


_TEXT_ONLY = _Upsert(np.zeros(0, dtype=np.float32), ())  # marker: compared by identity


class KeywordListener:
    """Keeps :class:`KeywordIndexes` in step with the applied records (applier thread)."""

    def __init__(
        self,
        indexes: KeywordIndexes,
        state: StateStore,
        configs: Mapping[str, IndexConfig] | None = None,
    ) -> None:
        self.indexes = indexes
        self.state = state
        # the indexer's live configs (set once the indexer exists); None: every index
        self.configs = configs
        # (index_key, id) -> the last change reported: an upsert, or None for a delete
        self._pending: dict[tuple[str, str], _Upsert | None] = {}
        self._resets: list[str] = []

    def _wanted(self, index_key: str) -> bool:
        if self.configs is None:
            return True
        config = self.configs.get(index_key)
        return config is not None and is_text_index(config)

    def upserted(
        self,
        index_key: str,
        id: str,
        vector: Vector,
        tags: Sequence[str],
        numeric: Mapping[str, float],
    ) -> None:
        if self._wanted(index_key):
            self._pending[(index_key, id)] = _Upsert(vector, tuple(tags))

    def deleted(self, index_key: str, id: str) -> None:
        if self._wanted(index_key):
            self._pending[(index_key, id)] = None

    def text_only(self, index_key: str, id: str) -> None:
        """``id`` is now a text-only record: in the state (so keyword-searchable), not in
        the vector index."""
        if self._wanted(index_key):
            self._pending[(index_key, id)] = _TEXT_ONLY

    def reset(self, index_key: str) -> None:
        for k in [k for k in self._pending if k[0] == index_key]:
            del self._pending[k]
        self._resets.append(index_key)

    def applied(self) -> None:
        resets, self._resets = self._resets, []
        for key in resets:
            self.indexes.reset(key)
        upserts: dict[str, list[KeywordDoc]] = {}
        deletes: dict[str, list[str]] = {}
        keep: dict[tuple[str, str], _Upsert | None] = {}
        for (key, id), change in self._pending.items():
            if change is None:
                deletes.setdefault(key, []).append(id)
                continue
            entry = self.state.entry(key, id)
            if entry is None or (
                change is not _TEXT_ONLY
                and (entry.tags != change.tags or not np.array_equal(entry.vector, change.vector))
            ):
                keep[(key, id)] = change  # not committed yet (early report)
                continue
            deletes.setdefault(key, []).append(id)  # its text may be gone
            doc = doc_from_entry(id, entry)
            if doc is not None:
                upserts.setdefault(key, []).append(doc)
        self._pending = keep
        for key in deletes.keys() | upserts.keys():
            if key in upserts or self.indexes.get(key) is not None:  # else nothing to delete
                self.indexes.index(key).apply(upserts.get(key, ()), deletes.get(key, ()))


class ListenerFanout:
    """Several :class:`ChangeListener`\\ s behind the indexer's one slot, told in order."""

    def __init__(self, *listeners: ChangeListener | None) -> None:
        self.listeners = [x for x in listeners if x is not None]

    def upserted(
        self,
        index_key: str,
        id: str,
        vector: Vector,
        tags: Sequence[str],
        numeric: Mapping[str, float],
    ) -> None:
        for x in self.listeners:
            x.upserted(index_key, id, vector, tags, numeric)

    def deleted(self, index_key: str, id: str) -> None:
        for x in self.listeners:
            x.deleted(index_key, id)

    def text_only(self, index_key: str, id: str) -> None:
        for x in self.listeners:
            hook = getattr(x, "text_only", None)
            if hook is not None:
                hook(index_key, id)

    def reset(self, index_key: str) -> None:
        for x in self.listeners:
            x.reset(index_key)

    def applied(self) -> None:
        for x in self.listeners:
            x.applied()
