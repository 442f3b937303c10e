"""FAISS layer of cbr: free functions over numpy arrays. Never imports cbr."""
