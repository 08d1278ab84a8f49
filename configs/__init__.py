"""The shipped recipes (`--hn-config NAME`): installed as the package `open_clip_hn.configs`.

This folder is their one source; pyproject.toml maps it into the package (no copy), and
`open_clip_hn.recipes` reads it with importlib.resources.
"""
