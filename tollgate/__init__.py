"""tollgate: governance for LLM traffic, in the proxies teams already run."""

__version__ = "0.1.0"
