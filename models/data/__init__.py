"""Data sources: the exact-likelihood synthetic language and tokenized text corpora."""
