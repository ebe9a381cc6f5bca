"""Patch databases and the search backends behind them."""

from .database import DatabaseError, DatabaseMeta, PatchDatabase
from .search import INDEX_TYPES, DeviceIVFPQSearch, ExactSearch, FaissFlatSearch, FaissIVFPQSearch, IVFPQSearch

__all__ = [
    "DatabaseError",
    "DatabaseMeta",
    "DeviceIVFPQSearch",
    "ExactSearch",
    "FaissFlatSearch",
    "FaissIVFPQSearch",
    "INDEX_TYPES",
    "IVFPQSearch",
    "PatchDatabase",
]
