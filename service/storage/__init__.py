"""Blob stores (content-addressed, local directory or S3)."""
