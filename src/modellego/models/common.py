"""Helpers shared by the zoo's builders."""


def scaled(channels: int, width: float) -> int:
    """A layer's channel count under the width multiplier: `max(1, round(channels * width))`."""
    return max(1, round(channels * width))
