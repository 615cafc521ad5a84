"""Launchers (import name `sparsedist_launch`): start a recipe's ranks with torchrun or `deepspeed`."""
