"""Patch databases and the search backends behind them."""

from .database import DatabaseError, DatabaseMeta, PatchDatabase
from .search import INDEX_TYPES, ExactSearch, FaissFlatSearch

__all__ = ["DatabaseError", "DatabaseMeta", "ExactSearch", "FaissFlatSearch", "INDEX_TYPES", "PatchDatabase"]
