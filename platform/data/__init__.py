"""Datasets: fixed, seeded splits of data that ships inside packages, and loaders for users' own files."""
