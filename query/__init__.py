"""Stage 2: images → CLIP image vectors → top-k prompts → blended prediction → submission / search / eval."""
