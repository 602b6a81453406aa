"""The model lifecycle: which version serves, and how a new one gets there."""
