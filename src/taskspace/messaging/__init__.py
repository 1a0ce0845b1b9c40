"""Messaging: durable streams with consumer groups (``space.stream``), and
best-effort live topics (``space.topic``)."""

from taskspace.messaging.streams import (
    Consumer,
    Group,
    Message,
    Stream,
    StreamCompacted,
    StreamMessage,
)
from taskspace.messaging.topic import Topic, TopicMessage, TopicSubscription

__all__ = [
    "Consumer",
    "Group",
    "Message",
    "Stream",
    "StreamCompacted",
    "StreamMessage",
    "Topic",
    "TopicMessage",
    "TopicSubscription",
]
