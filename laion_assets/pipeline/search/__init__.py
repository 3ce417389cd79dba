"""The search index: exact in memory, or FAISS IVF-PQ for large datasets."""
