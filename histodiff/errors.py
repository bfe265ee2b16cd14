"""Errors that carry a one-line message for the user (bad data, missing weights, bad paths)."""


class InputError(Exception):
    """Unusable input: a wrong path, an empty tile folder, a label file naming missing tiles."""


class WeightsNotFoundError(InputError):
    """Pretrained weights that could not be resolved offline; the message says how to get them."""
