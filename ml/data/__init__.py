"""Labelled images on disk: the catalog (torch-free), balanced splits and loading, the toy
domain."""
