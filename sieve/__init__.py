"""Sieve: one small LLM backbone serving embeddings, full ranking and compressed RAG answers."""
