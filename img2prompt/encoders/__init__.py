"""Encoders: the layer below both stages (build_index/ and query/ import it; it imports neither).

models (loading CLIP and MiniLM, identities), clip_ensemble (one or more CLIP models as one), tokenization,
text (CLIP text and MiniLM encoding, normalising, autocast), images (decoding), image_embed (CLIP image
encoding), prompts (prompt normalisation and dedup keys).
"""

# The device every command and API call uses unless told: CUDA when present (encoders/devices.py resolves it).
# Here, not in devices.py, so that a front end reads it without importing torch.
DEFAULT_DEVICE = "auto"
