"""One module per command: ``run(args) -> exit status`` and the table it prints."""
