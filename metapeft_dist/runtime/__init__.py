"""Distributed execution: the Ray driver (driver.py, with connection.py, pool.py,
dispatch.py and steppers.py), the MLX worker and the parameter server it runs as actors
(worker.py, param_server.py, plain classes testable without Ray), checkpoints
(checkpoint.py), the job-server client for submitted jobs (jobs.py) and the cluster
description (launcher.py), and the errors callers catch (errors.py, without ray). Only
these import ray, and jobs.py / launcher.py only when
called."""
