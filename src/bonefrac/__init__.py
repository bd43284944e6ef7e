"""bonefrac: bone X-ray fracture classification that reports honest numbers.

An assistive research tool, not a diagnostic device.
"""

__version__ = "0.1.0"
