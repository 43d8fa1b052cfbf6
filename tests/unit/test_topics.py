"""The topic registry's broker settings: every topic is compacted or has an explicit retention."""

from __future__ import annotations

from shared.topics import (
    ALL_TOPICS,
    CONTACT_DATA_RETENTION_MS,
    DEAD_LETTER,
    EVENTS,
    MAX_COMPACTION_LAG_MS,
    PROFILES,
    SEND_REQUESTS,
)


def test_every_topic_is_compacted_or_kept_for_an_explicit_time() -> None:
    for topic in ALL_TOPICS:
        config = topic.config()
        if topic.compacted:
            assert config == {
                "cleanup.policy": "compact",
                "max.compaction.lag.ms": str(MAX_COMPACTION_LAG_MS),
            }, topic.name
        else:
            assert set(config) == {"retention.ms"}, topic.name
            assert int(config["retention.ms"]) > 0, topic.name


def test_contact_data_is_kept_a_week_and_dead_letters_two() -> None:
    week = str(CONTACT_DATA_RETENTION_MS)
    assert EVENTS.config()["retention.ms"] == SEND_REQUESTS.config()["retention.ms"] == week
    assert DEAD_LETTER.config()["retention.ms"] == str(2 * CONTACT_DATA_RETENTION_MS)
    assert "retention.ms" not in PROFILES.config()
