"""FP8 e4m3 with block scales (float32 or e8m0): the format's definition (``spec``), its CPU merge (``merge``) and
check (``check``), and torch's codec for the other paths (``codec``: decoding, encoding, reading a BASE's config)."""
