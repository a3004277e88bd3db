"""bitsandbytes 4-bit (NF4, FP4) and 8-bit bases: decoded by ``codec`` (read, never written back in that format) and
merged into a float dtype through the torch route."""
