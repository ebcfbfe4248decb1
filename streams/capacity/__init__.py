"""Per-index capacity budgets: thresholds, actions, the archive and restores
(``manager.py`` states the order of actions and the guarantees)."""

from streams.capacity.archive import Archive, ArchivedRecord, AuditLog
from streams.capacity.budget import Level, Thresholds, Usage, importance_of
from streams.capacity.manager import CapacityAction, CapacityManager

__all__ = [
    "Archive",
    "ArchivedRecord",
    "AuditLog",
    "CapacityAction",
    "CapacityManager",
    "Level",
    "Thresholds",
    "Usage",
    "importance_of",
]
