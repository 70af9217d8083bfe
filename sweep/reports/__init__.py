"""Reports a researcher reads, computed from a run directory: markdown, plots, LLM bundles."""
