"""Data: read rows from files or the hub, map labels, split, tokenize, batch."""
