"""The refusal direction: hooks, forward passes, extraction, selection, validation,
orthogonalization, comparison, and the ``extract`` job."""
