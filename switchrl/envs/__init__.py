"""Environments and batched rollouts."""
