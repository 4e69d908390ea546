"""The master's bus side: ZeroMQ sockets, their drain loop, CURVE, node identity, incarnations."""
