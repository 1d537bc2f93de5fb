"""Model parts: frozen vision towers, projectors, <image> splicing, the LLaVA model."""
