//! Native model zoo. STUB (being implemented).
