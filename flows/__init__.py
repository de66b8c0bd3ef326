"""shardflow.flows."""
