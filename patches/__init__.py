"""The upstreamable OpenCLIP patch (`open_clip_train-plugins.patch`, see README.md here):
installed as the package `open_clip_hn.patches`, so a wheel install can apply it too.

This folder is its one source; pyproject.toml maps it into the package (no copy).
"""
