"""What runs inside a worker process: its device, the NumPy/torch bridge, the compute paths, the loop, built-in stages."""

__all__ = ["bridge", "compute", "devices", "runtime", "spec", "stages"]
