"""Development helpers: start a local cluster (launcher) and send request bursts (loadgen)."""
