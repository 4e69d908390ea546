"""exo-master: the scheduling heart of an exo cluster."""
