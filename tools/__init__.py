"""Tooling around shardflow that is not part of the runtime package (run from the repository root)."""
