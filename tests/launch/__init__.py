"""Tests of launch/: the SLURM scripts on a real two-node cluster."""
