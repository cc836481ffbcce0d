"""batchd: embed a SQLite table of text chunks with cloud batch APIs into sqlite-vec."""

__version__ = "0.1.0"
