"""Messaging: durable streams with consumer groups, and live topics."""
