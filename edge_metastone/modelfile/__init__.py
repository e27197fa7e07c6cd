"""Model GGUF files: `read` opens and validates one, `head` writes the SPRM head, `copy` copies a
model file (with a new head or extra keys)."""
