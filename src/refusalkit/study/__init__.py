"""The whole study (``refusalkit run``) and its report."""
