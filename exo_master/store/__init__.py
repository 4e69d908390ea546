"""What the master keeps on disk between runs: the desired placements (--state-dir)."""
