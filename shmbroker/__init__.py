"""shmbroker's pipeline layer: the YAML schema, planning, the driver, the supervisor, the CLI.

It stands on the worker runtime (``workers``) and the store (``broker``);
neither imports it. ``from broker import Pipeline`` reaches ``driver.Pipeline``.
"""

__all__ = ["cli", "config", "doctor", "driver", "forkserver_exit", "io", "output", "plan", "summary",
           "supervisor"]
