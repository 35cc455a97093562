"""Stage 1: corpus → embeddings → index build job."""
