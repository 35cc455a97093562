"""The on-disk index: its format (layout, manifest, writer, reader, lock) and the search backends."""
