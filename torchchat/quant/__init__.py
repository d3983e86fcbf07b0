"""Quantization from one JSON recipe: schemes, quantized linears and embeddings, GPTQ."""
