"""exo-worker: runs model instances on one machine and serves the master's assignments."""
