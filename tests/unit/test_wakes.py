"""How wakes are packed into NOTIFY payloads and read back (no server; the relay between
real processes is tested against PostgreSQL in tests/integration/postgres/test_wakes.py)."""

from __future__ import annotations

from service.wakes import MAX_PAYLOAD, PostgresRelay, _chunks, _merged


def test_chunks_keep_every_key_once_under_the_limit() -> None:
    keys = [f"key-{i:05d}" for i in range(3000)]
    chunks = list(_chunks(keys, 1000))
    assert [key for chunk in chunks for key in chunk] == keys
    assert all(len(" ".join(chunk)) < 1000 for chunk in chunks)


def test_queued_wakes_merge_per_topic_and_flag_without_duplicates() -> None:
    payloads = list(
        _merged(
            [
                "o1 poll k w1 w2",
                "o1 log p t1@",
                "o1 poll k w2 w3",
                "o1 log p t1@",
            ]
        )
    )
    assert payloads == ["o1 poll k w1 w2 w3", "o1 log p t1@"]


def test_a_large_batch_is_split_at_the_payload_limit() -> None:
    keys = " ".join(f"worker-{i:08d}" for i in range(2000))
    payloads = list(_merged([f"o1 poll k {keys}"]))
    assert len(payloads) > 1
    assert all(len(payload.encode()) < MAX_PAYLOAD for payload in payloads)
    received = [key for payload in payloads for key in payload.split(" ")[3:]]
    assert received == keys.split(" ")


def test_a_process_skips_its_own_wakes_and_hands_the_others_to_the_topic() -> None:
    relay = PostgresRelay("host=unused")
    got: list[tuple[list[str], bool]] = []
    relay._receivers["poll"] = lambda keys, prefix: got.append((keys, prefix))
    relay._origin = "me"
    relay._received("me poll k w1")
    relay._received("other poll k w2 w3")
    relay._received("other poll p t1@")
    relay._received("other unknown-topic k w4")
    relay._received("garbage")
    assert got == [(["w2", "w3"], False), (["t1@"], True)]
