"""Where recordings come from: the embedded default corpus and ingestion of your own folders."""
