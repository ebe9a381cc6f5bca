"""Patch databases and the search backends behind them."""

from .database import PatchDatabase
from .distributed import DistributedDatabase
from .meta import DatabaseError, DatabaseMeta
from .search import INDEX_TYPES, DeviceIVFPQSearch, ExactSearch, FaissFlatSearch, FaissIVFPQSearch, IVFPQSearch

__all__ = [
    "DatabaseError",
    "DatabaseMeta",
    "DeviceIVFPQSearch",
    "DistributedDatabase",
    "ExactSearch",
    "FaissFlatSearch",
    "FaissIVFPQSearch",
    "INDEX_TYPES",
    "IVFPQSearch",
    "PatchDatabase",
]
