"""What a person uses: the `dinosearch` command line (and, later, the HTTP API and web page)."""
