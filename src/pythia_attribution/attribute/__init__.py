"""The attribute stage: which training sequences are responsible for each exhibited behavior."""
