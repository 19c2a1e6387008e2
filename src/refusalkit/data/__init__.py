"""Prompt sources and splits, text corpora, refusal phrases and the refusal judge."""
