"""Model management: the alias table, downloads from the Hugging Face hub, the local model folder."""
