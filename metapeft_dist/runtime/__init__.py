"""Distributed execution: the Ray driver (driver.py), the MLX worker and the parameter
server it runs as actors (worker.py, param_server.py, plain classes testable without
Ray), and checkpoints (checkpoint.py). driver.py is the only module that imports ray."""
