"""Retrieval service: user context or vector -> nearest items from the bundle's FAISS index."""
