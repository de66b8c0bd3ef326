"""shardflow.train."""
