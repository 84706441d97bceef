"""Reliable events: transactional outbox -> relay -> JetStream -> inbox consumer (docs/architecture.md)."""
