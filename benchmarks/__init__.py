"""SaRA against its peers: the memory benchmark and the quality study, run with `python -m`."""
