"""Independent numpy references, transcribed from the formulas in docs/architecture.md and
/work/shared/reference/ctr_accessor_semantics.md (never from the C++ sources)."""
