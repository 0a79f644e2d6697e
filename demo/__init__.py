"""The embedded demo: the builder of its tiny base and the DreamBooth-SaRA runner, run with `python -m`."""
