"""Offline calibration: capture what attention consumes, accumulate second moments, fit rotations.

Installed as ``vllm_oscar.calibrate`` (a top-level ``calibrate`` module would collide with other
packages). Needs the ``calibrate`` extra: ``pip install 'vllm-oscar[calibrate]'``.
"""
