"""One model instance across several processes (ranks) with MLX distributed: the worker side.

    rank 0 (in the worker that talks to the master)      ranks 1..K-1 (followers)
    ShardedEngine: Engine for the runner                  follower.run_follower: no master link
      BatchScheduler -> lockstep.Broadcasting*  --ZeroMQ control-->  lockstep.Mirror
      model shard (tensor: shard(); pipeline: stage) <==MLX ring==> model shard

- topology.py: the spec of a sharded instance (ranks, ring addresses, control endpoint, split) and
  joining the MLX `ring` group;
- shard_load.py: loading this rank's shard (tensor parallel with mlx-lm's `shard()`, pipeline
  parallel with our own Llama-family stage, activations passed with send/recv);
- control.py: the control channel between ranks (messages, heartbeats, loss detection);
- lockstep.py: rank 0 broadcasts every batch decision, followers replay them in order;
- engine.py: the rank-0 engine; follower.py: the process of a rank > 0;
- generate.py: a master-less driver (by hand, tests and the benchmark).
"""
