"""The on-disk index: format (manifest, files) and the FAISS part."""
