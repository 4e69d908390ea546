"""One model instance across several processes (ranks) with MLX distributed: the worker side.

    rank 0 (in the worker, or its child process)         ranks 1..K-1 (followers)
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
- rank0_process.py + frames.py: rank 0 as a child process of the worker, for the ranks the master
  places (the worker's side is exo_worker/process_engine.py and exo_worker/shard_ranks.py);
- cli.py: exo-worker's sharding flags (ring ports, manual ranks);
- generate.py: a master-less driver (by hand, tests and the benchmark).
"""
