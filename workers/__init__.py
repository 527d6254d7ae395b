"""What runs inside a worker process: the NumPy/torch bridge, devices, the worker loop, built-in stages."""

__all__ = ["bridge", "devices", "runtime", "stages"]
