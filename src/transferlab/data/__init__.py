"""Labelled images: decoding any file to RGB under a pixel limit, scanning a folder, finding
duplicates, the duplicate-aware split, transforms, and the Dataset every batch comes from."""
