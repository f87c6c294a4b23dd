"""Gin files (a package so that gin can read them from the Python path)."""
