"""Export: the same Transformer through torch.export to AOT Inductor packages and ExecuTorch programs."""
