"""The published task orders of the ``CL_Benchmark`` (:mod:`lmas.data.cl_benchmark`), by benchmark and number."""

from __future__ import annotations

# Published task orders (O-LoRA's and SAPT's scripts; "6" is the third long-sequence order of Progressive Prompts,
# found in a PIKA/GainLoRA-style script as its order 5: see docs/data-cl-benchmark.md for the numbering).
ORDERS: dict[str, dict[int, list[str]]] = {
    "standard": {
        1: ["dbpedia", "amazon", "yahoo", "agnews"],
        2: ["dbpedia", "amazon", "agnews", "yahoo"],
        3: ["yahoo", "amazon", "agnews", "dbpedia"],
    },
    "long": {
        4: "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolq wic".split(),
        5: "mnli cb wic copa qqp boolq rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo".split(),
        6: "multirc boolq wic mnli cb copa qqp rte imdb sst2 dbpedia agnews yelp amazon yahoo".split(),
    },
    "superni": {
        1: (
            "task1572_samsum_summary task363_sst2_polarity_classification task1290_xsum_summarization "
            "task181_outcome_extraction task002_quoref_answer_generation task1510_evalution_relation_extraction "
            "task639_multi_woz_user_utterance_generation task1729_personachat_generate_next "
            "task073_commonsenseqa_answer_generation task1590_diplomacy_text_generation "
            "task748_glucose_reverse_cause_event_detection task511_reddit_tifu_long_text_summarization "
            "task591_sciq_answer_generation task1687_sentiment140_classification task875_emotion_classification "
        ).split(),
        2: (
            "task748_glucose_reverse_cause_event_detection task073_commonsenseqa_answer_generation "
            "task1590_diplomacy_text_generation task639_multi_woz_user_utterance_generation "
            "task1572_samsum_summary task1687_sentiment140_classification task591_sciq_answer_generation "
            "task363_sst2_polarity_classification task1510_evalution_relation_extraction "
            "task1729_personachat_generate_next task181_outcome_extraction "
            "task511_reddit_tifu_long_text_summarization task002_quoref_answer_generation "
            "task1290_xsum_summarization task875_emotion_classification "
        ).split(),
    },
}
