"""Everything that touches bytes at rest: URIs, atomic publish, JSONL/Parquet, digests, manifests.

Imports nothing else of the project, so every other part can depend on it.
"""
from .config import StorageConfig
from .store import Stat, Storage, StorageError, digest_bytes, digest_json, split_protocol

__all__ = ["Stat", "Storage", "StorageConfig", "StorageError", "digest_bytes", "digest_json", "split_protocol"]
