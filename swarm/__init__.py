"""The Swarm application: the ``python -m swarm`` command line (join, generate, status, demo,
bootstrap) on top of ``model_shards``, the DHT and the p2p Host."""
