"""Datasets, partitions and the validation every data file goes through (simulation and agents alike)."""
