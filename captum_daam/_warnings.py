"""Warnings attributed to the user's line, however deep in the package they are raised."""

import os
import sys
import warnings

import captum

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CAPTUM_DIR = os.path.dirname(os.path.abspath(captum.__file__)) + os.sep


def warn_user(message: str) -> None:
    """``warnings.warn(message)`` pointing at the first caller outside captum-daam and Captum
    (whose ``log_usage`` wraps ``attribute``)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _CAPTUM_DIR)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
