"""Adapter lineage from agent histories: parents of every version, order, the drawing."""

from __future__ import annotations

from lmas.tracking import lineage

# peer-to-peer on a ring of 3 (as the loop records it): round-robin training, then an exact merge
P2P = {
    "agent0": [
        {"round": 0, "event": "trained", "task": "bbc"},
        {"round": 1, "event": "merged", "sources": ["agent0", "agent2", "agent1"], "via": "peer_to_peer/ring"},
    ],
    "agent1": [
        {"round": 0, "event": "merged", "sources": ["agent0"], "via": "peer_to_peer/ring"},
        {"round": 1, "event": "trained", "task": "chat"},
        {"round": 1, "event": "merged", "sources": ["agent1", "agent0", "agent2"], "via": "peer_to_peer/ring"},
    ],
    "agent2": [
        {"round": 0, "event": "merged", "sources": ["agent0"], "via": "peer_to_peer/ring"},
    ],
}


def _parents(vs):
    return {v.key: v.parents for v in vs}


def test_exchange_after_training_points_to_the_state_that_was_sent():
    vs = lineage.versions(P2P)
    p = _parents(vs)
    # round 0: agent0 only trained, so its saved round-0 version is exactly what it sent
    assert p[("agent0", 0)] == []
    assert p[("agent1", 0)] == [("agent0", 0, "merged")]
    assert p[("agent2", 0)] == [("agent0", 0, "merged")]
    # round 1: the senders were merged into too, so their round-1 files are not what they sent:
    # the edge goes to their previous versions
    assert p[("agent0", 1)] == [("agent0", 0, "self"), ("agent2", 0, "merged"), ("agent1", 0, "merged")]
    assert p[("agent1", 1)] == [("agent1", 0, "self"), ("agent0", 0, "merged"), ("agent2", 0, "merged")]
    assert ("agent2", 1) not in p  # nothing happened to agent2 in round 1: no version


def test_versions_are_ordered_parents_first_and_labelled_like_the_adapter_files():
    vs = lineage.versions(P2P)
    seen = set()
    for v in vs:
        assert all((a, r) in seen for a, r, _ in v.parents), v
        seen.add(v.key)
    assert [v.key for v in vs] == [("agent0", 0), ("agent1", 0), ("agent2", 0), ("agent0", 1), ("agent1", 1)]
    assert {v.key: v.label for v in vs}[("agent1", 1)] == "chat+merged"


def test_transfer_before_training_uses_earlier_versions_and_any_source_key():
    histories = {
        "a": [{"round": 0, "event": "trained", "task": "t0"}],
        "b": [{"round": 0, "event": "trained", "task": "t1"}],
        "c": [
            {"round": 1, "event": "merge_init", "transfer": "merge_init", "sources": ["a", "b"], "weights": [0.5, 0.5]},
            {"round": 1, "event": "trained", "task": "t2"},
            {"round": 2, "event": "distilled", "teachers": ["a"]},
            {"round": 3, "event": "distilled", "teacher": "b"},
        ],
        "a2": [{"round": 1, "event": "trained", "task": "t0"}],
    }
    p = _parents(lineage.versions(histories))
    assert p[("c", 1)] == [("a", 0, "merge_init"), ("b", 0, "merge_init")]
    assert p[("c", 2)] == [("c", 1, "self"), ("a", 0, "distilled")]
    assert p[("c", 3)] == [("c", 2, "self"), ("b", 0, "distilled")]
    assert lineage.parents_of(histories, "c", 1) == p[("c", 1)]
    assert lineage.parents_of(histories, "c", 7) == []


def test_a_source_without_any_version_gives_no_edge():
    histories = {"x": [{"round": 0, "event": "merged", "sources": ["ghost"]}]}
    assert _parents(lineage.versions(histories)) == {("x", 0): []}


def test_refs_are_wandb_artifact_names_with_round_aliases():
    assert lineage.ref("agent3", 12) == "adapter-agent3:round012"
    assert lineage.artifact_name("agent3") == "adapter-agent3" and lineage.alias(0) == "round000"


def test_draw_writes_a_png_and_nothing_without_versions(tmp_path):
    out = tmp_path / "lineage.png"
    assert lineage.draw(P2P, out) is True
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert lineage.draw({"a": []}, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()
