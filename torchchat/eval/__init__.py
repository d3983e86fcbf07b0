"""Evaluation: WikiText perplexity as lm-evaluation-harness defines it, and any lm-eval task."""
