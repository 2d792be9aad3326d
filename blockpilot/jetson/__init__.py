"""On-device pieces for NVIDIA Jetson Orin and Thor: platform and version detection, engine profiles tied to the
export targets, power modes with restore, tegrastats recording and device benchmarks.

Non-Python assets (the systemd unit, its wrapper script and the guide) live in the repository's ``jetson/``
directory; this package is what ships with ``pip install blockpilot``. Nothing here imports torch at module level.
"""
