"""Ways to start ATMA pretraining: single node, multi-node over pdsh, per-node `--no_ssh`, SLURM.

`python -m launch MODE ... [--dry-run]` builds the exact `deepspeed` command (`launch.commands`)
and prints or runs it; the shell scripts beside this file wrap it. `python -m launch.quickstart`
runs the whole pipeline on the built-in corpus. No training logic lives here.
"""
