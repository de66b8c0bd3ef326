"""shardflow.storage."""
