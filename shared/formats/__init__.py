"""The artifact formats that cross a stage boundary, each with one owner module (format version,
record, writer and reader)."""
