"""Reliable events: transactional outbox -> relay -> JetStream -> inbox consumer (DESIGN.md §3)."""
