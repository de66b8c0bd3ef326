"""shardflow.dataprep."""
