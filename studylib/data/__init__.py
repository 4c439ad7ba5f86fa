"""Datasets in their published layouts: readers with a decoded cache, splits, sources (real folders or
the synthetic generator), checks and downloads."""
