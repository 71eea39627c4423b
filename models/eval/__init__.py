"""Evaluation: generative perplexity under an independent evaluator, entropy, speed."""
