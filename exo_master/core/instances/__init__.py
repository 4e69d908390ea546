"""Where models live: the master's desired placements and the pure rules that realise them.

desired     what an operator asked for (model, replicas, nodes, slots), and its file format
memory      how much memory one instance needs (weights + KV headroom)
lifecycle   the replica statuses and the one transition table
rule        the memory-aware placement rule: a pure function of (desired, nodes, instances)
controller  reconcile desired with actual: LoadInstance / UnloadInstance, healing, draining
view        the rows served on /v1/instances (in protocol.instance_view)
"""
