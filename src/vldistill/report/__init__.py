"""Table builders used by the report notebooks (pandas)."""
