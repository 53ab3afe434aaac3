"""Multi-node tests: two real nodes (network namespaces with their own addresses) on one host, with and without a
real SLURM cluster on them (cluster.py; fixtures in conftest.py)."""
