"""The base layer: errors, configuration, atomic artifacts, the run directory's layout, the manifest,
progress bars. Imports nothing else from refusalkit."""
