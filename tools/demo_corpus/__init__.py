"""The demo corpus builder (build.py); the runtime reader is shardflow.dataprep.demo_corpus."""
