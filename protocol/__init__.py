"""Wire protocol shared by exo-master and exo-worker: ids, messages, envelope, codec. No I/O."""
