"""Evaluation of refusal: attacks, judges and the statistics reported with them."""
