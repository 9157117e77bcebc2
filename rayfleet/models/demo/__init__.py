"""The bundled demo model pair (target + distilled draft) and its training pipeline."""
